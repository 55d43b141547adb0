"""One small tokenizer interface over sentencepiece, Hugging Face `tokenizer.json` and tiktoken.

    tok = get_tokenizer("checkpoints/smollm2")      # a checkpoint directory or a tokenizer file
    ids = tok.encode("Hello")                        # never adds BOS; see tok.add_bos / tok.bos_id
    text = tok.decode(ids)
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])   # chat template applied, ready to feed
    if next_id in tok.eos_ids: ...

Special-token strings written in the text ("<|im_start|>", "<s>", ...) are encoded as the special tokens,
as llama.cpp and Hugging Face do, so a rendered chat template can be encoded like any other text.
The chat template is the checkpoint's own (`tokenizer_config.json`'s `chat_template`, which the converter
also fills from GGUF metadata) or, where it has none, a built-in one for its family.
"""
import json
import os
import re
from typing import Optional

# Built-in chat templates (Jinja), for checkpoints that do not carry their own.
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Meta's Llama 3 tiktoken files: the pre-tokenizer split pattern and the 256 special tokens after the ranks.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIAL += [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - len(LLAMA3_SPECIAL) + 3)]


class Tokenizer:
    """Common part: special tokens, BOS/EOS, chat template. Backends implement _encode_plain and decode."""
    bos_id: Optional[int] = None
    eos_ids: set = frozenset()
    add_bos: bool = False            # whether a plain (non-chat) prompt should start with BOS
    chat_template: Optional[str] = None
    special: dict = {}               # special-token string -> id, recognised inside text

    def _encode_plain(self, text: str) -> list:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def encode(self, text: str) -> list:
        """Token ids for text, special-token strings included, with no BOS added."""
        if not self.special:
            return self._encode_plain(text)
        ids = []
        pattern = "(" + "|".join(re.escape(s) for s in sorted(self.special, key=len, reverse=True)) + ")"
        for i, part in enumerate(re.split(pattern, text)):
            if i % 2:
                ids.append(self.special[part])
            elif part:
                ids.extend(self._encode_plain(part))
        return ids

    def encode_prompt(self, text: str) -> list:
        """A plain prompt as the model expects it: BOS first where the model uses one."""
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + self.encode(text)

    def render_chat(self, messages: list, add_generation_prompt: bool = True) -> str:
        import jinja2
        import jinja2.sandbox

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        template = env.from_string(self.chat_template or self._default_template())
        piece = lambda i: self.id_to_piece(i) if i is not None else ""
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=piece(self.bos_id), eos_token=piece(min(self.eos_ids, default=None)))

    def encode_chat(self, messages: list, add_generation_prompt: bool = True) -> list:
        """messages: [{"role": "system"|"user"|"assistant", "content": str}, ...] -> token ids."""
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def _default_template(self) -> str:
        if "<|im_start|>" in self.special:
            return CHATML_TEMPLATE
        if "<|start_header_id|>" in self.special:
            return LLAMA3_TEMPLATE
        return LLAMA2_TEMPLATE


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_path: str):
        import sentencepiece
        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_ids = {self.sp.eos_id()} if self.sp.eos_id() >= 0 else set()
        self.add_bos = self.bos_id is not None
        self.special = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())
                        if self.sp.is_control(i) and i not in (self.sp.unk_id(),)}

    def _encode_plain(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode(list(ids))

    def id_to_piece(self, i):
        return self.sp.id_to_piece(i)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (byte-level BPE and others) through the `tokenizers` library."""

    def __init__(self, json_path: str):
        from tokenizers import Tokenizer as _Tokenizer
        self.tk = _Tokenizer.from_file(json_path)
        self.special = {t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}

    def encode(self, text):
        # The library itself splits special-token strings out of the text.
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tk.decode(list(ids), skip_special_tokens=True)

    def id_to_piece(self, i):
        return self.tk.id_to_token(i)

    def token_id(self, token) -> Optional[int]:
        if isinstance(token, dict):  # tokenizer_config.json may write {"content": "<s>", ...}
            token = token.get("content")
        return self.tk.token_to_id(token) if token else None


class TiktokenTokenizer(Tokenizer):
    """Meta's original Llama 3 `tokenizer.model`: base64 tokens with ranks, plus 256 special tokens."""

    def __init__(self, model_path: str):
        import base64
        import tiktoken
        ranks = {}
        with open(model_path, "rb") as f:
            for line in f:
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
        self.n_ranks = len(ranks)
        self.special = {s: self.n_ranks + i for i, s in enumerate(LLAMA3_SPECIAL)}
        self.enc = tiktoken.Encoding(name=os.path.basename(model_path), pat_str=LLAMA3_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=self.special)
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eos_ids = {self.special[s] for s in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")}
        self.add_bos = True
        self.pieces = {i: s for s, i in self.special.items()}

    def _encode_plain(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([i for i in ids if i < self.n_ranks])

    def id_to_piece(self, i):
        return self.pieces.get(i) or self.enc.decode_single_token_bytes(i).decode("utf-8", "replace")


def _is_tiktoken_file(path: str) -> bool:
    """Tiktoken files are text lines 'base64 rank'; sentencepiece files are binary protobuf."""
    with open(path, "rb") as f:
        first = f.readline(200)
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", first) is not None


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def get_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a checkpoint directory, or of a `tokenizer.json` / `tokenizer.model` file."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        candidates = [os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")]
        found = [p for p in candidates if os.path.exists(p)]
        if not found:
            raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in the directory")
        path = found[0]
    elif not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such tokenizer file")

    if path.endswith(".json"):
        tok = HFTokenizer(path)
    elif _is_tiktoken_file(path):
        tok = TiktokenTokenizer(path)
    else:
        tok = SentencePieceTokenizer(path)

    # The checkpoint's own settings override the backend's defaults.
    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    generation = _read_json(os.path.join(directory, "generation_config.json"))
    if isinstance(tok, HFTokenizer):
        tok.bos_id = tok.token_id(config.get("bos_token"))
        eos = tok.token_id(config.get("eos_token"))
        tok.eos_ids = {eos} if eos is not None else set()
        # Without a stated add_bos_token, ask the tokenizer.json's own post-processor.
        add_bos = config.get("add_bos_token", tok.tk.encode("a", add_special_tokens=True).ids[:1] == [tok.bos_id])
        tok.add_bos = bool(add_bos) and tok.bos_id is not None
    elif "add_bos_token" in config:
        tok.add_bos = bool(config["add_bos_token"])
    eos = generation.get("eos_token_id")
    if eos is not None:
        tok.eos_ids = set(tok.eos_ids) | set(eos if isinstance(eos, list) else [eos])
    template = config.get("chat_template")
    if isinstance(template, list):  # some repos ship several named templates
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    tok.chat_template = template or None
    # Chat models end a turn with a token of their own; stop there too.
    for end_of_turn in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>"):
        if end_of_turn in tok.special:
            tok.eos_ids = set(tok.eos_ids) | {tok.special[end_of_turn]}
    return tok
