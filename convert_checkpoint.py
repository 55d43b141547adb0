"""Convert LLaMA-family checkpoints into nimblelm's format: `config.json` + `model.safetensors` + tokenizer.

    python convert_checkpoint.py SOURCE --out DIR [--dtype bfloat16|float16|float32]
    python convert_checkpoint.py --hf-repo HuggingFaceTB/SmolLM2-135M-Instruct --out DIR

SOURCE is detected by what it holds:
  - a Hugging Face model directory: config.json with model.safetensors, sharded safetensors with their
    index, or pickled pytorch_model*.bin shards (read with torch.load(weights_only=True));
  - Meta's original layout: params.json with consolidated.*.pth shards;
  - a GGUF file (llama.cpp) of the llama architecture, any common tensor type, tokenizer rebuilt;
  - a llama2.c .bin file, with its sentencepiece tokenizer.model beside it or given by --tokenizer.

Every reader yields the weights under Hugging Face names and in Hugging Face's RoPE layout ("rotate
half"); sources that interleave the rotated pairs (Meta, GGUF, llama2.c) are permuted here. The output is
written to a temporary directory that is renamed into place only when complete.
"""
import glob
import json
import os
import shutil
import struct
import sys
import tempfile
from contextlib import contextmanager

import torch

from errors import ArgumentParser, UsageError, run_command
from model import ModelArgs

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json")


class ConversionError(UsageError):
    """A source that cannot be converted: named, in one line."""


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows (or biases) from interleaved RoPE pairs (x0, x1), (x2, x3)... to the
    rotate-half layout (x0, x2, ...), (x1, x3, ...), head by head."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face directories


def hf_config_to_args(config: dict, max_seq_len=None) -> ModelArgs:
    model_type = config.get("model_type", "llama")
    if model_type not in ("llama", "mistral", "qwen2"):
        raise ConversionError(f"model_type {model_type!r} is not a LLaMA-family model (llama, mistral, qwen2)")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {config['hidden_act']!r} is not supported (only silu)")
    if config.get("mlp_bias") or (model_type == "llama" and config.get("attention_bias")):
        raise ConversionError("biases on the output or MLP projections are not supported")
    # Two layouts in the wild: rope_theta + rope_scaling, and the newer rope_parameters.
    rope = dict(config.get("rope_parameters") or {})
    rope_base = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or rope
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        rope_scaling = None
    elif kind == "linear":
        rope_scaling = {"type": "linear", "factor": float(scaling["factor"])}
    elif kind == "llama3":
        rope_scaling = {"type": "llama3", "factor": float(scaling["factor"]),
                        "low_freq_factor": float(scaling["low_freq_factor"]),
                        "high_freq_factor": float(scaling["high_freq_factor"]),
                        "original_max_seq_len": int(scaling["original_max_position_embeddings"])}
    else:
        raise ConversionError(f"RoPE scaling {kind!r} is not supported (linear and llama3 are)")
    context = config.get("max_position_embeddings", 2048)
    if config.get("sliding_window") and config.get("use_sliding_window", model_type == "mistral"):
        # Sliding-window attention is not implemented: within the window it is plain causal attention,
        # so limit the context to the window rather than compute something different beyond it.
        context = min(context, config["sliding_window"])
    n_heads = config["num_attention_heads"]
    return ModelArgs(
        dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
        intermediate_size=config["intermediate_size"], vocab_size=config["vocab_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6), rope_base=float(rope_base), rope_scaling=rope_scaling,
        max_seq_len=max_seq_len or context, tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)))


def read_hf(directory: str, max_seq_len=None):
    from safetensors import safe_open
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    args = hf_config_to_args(config, max_seq_len)

    opened = {}

    def open_file(path):
        if path not in opened:
            opened[path] = (safe_open(path, framework="pt") if path.endswith(".safetensors") else
                            torch.load(path, map_location="cpu", mmap=True, weights_only=True))
        return opened[path]

    exists = lambda name: os.path.exists(os.path.join(directory, name))
    index = next((n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json") if exists(n)), None)
    single = next((n for n in ("model.safetensors", "pytorch_model.bin") if exists(n)), None)
    if index:
        with open(os.path.join(directory, index)) as f:
            weight_map = {k: os.path.join(directory, v) for k, v in json.load(f)["weight_map"].items()}
    elif single:
        path = os.path.join(directory, single)
        weight_map = {k: path for k in open_file(path).keys()}
    else:
        raise ConversionError(f"{directory}: no model.safetensors, pytorch_model.bin or their index")

    def get(name):
        path = weight_map.get(name)
        if path is None:
            return None
        handle = open_file(path)
        return handle.get_tensor(name) if path.endswith(".safetensors") else handle[name]

    prefix = "model.layers.{}."
    names = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight",
             "q": prefix + "self_attn.q_proj.weight", "k": prefix + "self_attn.k_proj.weight",
             "v": prefix + "self_attn.v_proj.weight", "o": prefix + "self_attn.o_proj.weight",
             "q_bias": prefix + "self_attn.q_proj.bias", "k_bias": prefix + "self_attn.k_proj.bias",
             "v_bias": prefix + "self_attn.v_proj.bias",
             "gate": prefix + "mlp.gate_proj.weight", "up": prefix + "mlp.up_proj.weight",
             "down": prefix + "mlp.down_proj.weight", "attn_norm": prefix + "input_layernorm.weight",
             "ffn_norm": prefix + "post_attention_layernorm.weight"}
    if "lm_head.weight" not in weight_map and not args.tie_embeddings:
        args.tie_embeddings = True  # a head stored nowhere is the embedding

    def write_tokenizer(out):
        copied = 0
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(directory, name)):
                shutil.copy(os.path.join(directory, name), out)
                copied += 1
        if not copied:
            raise ConversionError(f"{directory}: no tokenizer.json or tokenizer.model to go with the weights")

    return args, lambda key, layer=None: get(names[key].format(layer)), write_tokenizer


# ---------------------------------------------------------------------------------------------------------
# Meta's original layout: params.json + consolidated.NN.pth (model-parallel shards)

# How Meta's model-parallel shards split each weight: 0 = rows (column-parallel), 1 = columns, None = copies.
META_SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}


def read_meta(directory: str, max_seq_len=None):
    with open(os.path.join(directory, "params.json")) as f:
        params = json.load(f)
    paths = sorted(glob.glob(os.path.join(directory, "consolidated.*.pth")))
    if not paths:
        raise ConversionError(f"{directory}: params.json but no consolidated.*.pth shards")
    shards = [torch.load(p, map_location="cpu", mmap=True, weights_only=True) for p in paths]

    def merged(name):
        if name not in shards[0]:
            return None
        kind = name.split(".")[-2]
        dim = META_SPLIT.get(kind)
        if dim is None or len(shards) == 1:
            return shards[0][name]
        return torch.cat([s[name] for s in shards], dim=dim)

    dim, n_heads = params["dim"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    vocab_size = merged("tok_embeddings.weight").shape[0]
    scaled = params.get("use_scaled_rope", False)
    rope_scaling = ({"type": "llama3", "factor": float(params.get("rope_scaling_factor", 8.0)),
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192}
                    if scaled else None)
    if max_seq_len is None:
        # Meta's params.json does not state the context length; these are the released models' values.
        max_seq_len = params.get("max_seq_len") or (131072 if scaled else 8192 if vocab_size >= 128000 else 4096)
    args = ModelArgs(dim=dim, n_layers=params["n_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads,
                     head_dim=dim // n_heads, intermediate_size=merged("layers.0.feed_forward.w1.weight").shape[0],
                     vocab_size=vocab_size, norm_eps=params.get("norm_eps", 1e-5),
                     rope_base=float(params.get("rope_theta", 10000.0)), rope_scaling=rope_scaling,
                     max_seq_len=max_seq_len, tie_embeddings=False, attention_bias=False)
    names = {"embed": "tok_embeddings.weight", "norm": "norm.weight", "lm_head": "output.weight",
             "q": "layers.{}.attention.wq.weight", "k": "layers.{}.attention.wk.weight",
             "v": "layers.{}.attention.wv.weight", "o": "layers.{}.attention.wo.weight",
             "gate": "layers.{}.feed_forward.w1.weight", "up": "layers.{}.feed_forward.w3.weight",
             "down": "layers.{}.feed_forward.w2.weight", "attn_norm": "layers.{}.attention_norm.weight",
             "ffn_norm": "layers.{}.ffn_norm.weight"}

    def get(key, layer=None):
        if key not in names:
            return None
        w = merged(names[key].format(layer))
        if key in ("q", "k"):
            w = interleaved_to_half(w, n_heads if key == "q" else n_kv_heads)
        return w

    def write_tokenizer(out):
        for candidate in (directory, os.path.dirname(os.path.abspath(directory))):
            if os.path.exists(os.path.join(candidate, "tokenizer.model")):
                shutil.copy(os.path.join(candidate, "tokenizer.model"), out)
                return
        raise ConversionError(f"{directory}: no tokenizer.model beside params.json or in its parent directory")

    return args, get, write_tokenizer


# ---------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp)


def gguf_value(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_gguf(path: str, max_seq_len=None):
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise ConversionError(f"{path}: not a readable GGUF file ({e})")
    arch = gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise ConversionError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    tensors = {t.name: t for t in reader.tensors}
    n_heads = int(gguf_value(reader, "llama.attention.head_count"))
    n_kv_heads = int(gguf_value(reader, "llama.attention.head_count_kv", n_heads))
    dim = int(gguf_value(reader, "llama.embedding_length"))
    head_dim = int(gguf_value(reader, "llama.attention.key_length", dim // n_heads))
    vocab_size = int(gguf_value(reader, "llama.vocab_size", tensors["token_embd.weight"].shape[-1]))
    scaling_type = gguf_value(reader, "llama.rope.scaling.type", "none")
    rope_scaling = None
    if scaling_type == "linear":
        rope_scaling = {"type": "linear", "factor": float(gguf_value(reader, "llama.rope.scaling.factor"))}
    elif scaling_type not in ("none", None):
        raise ConversionError(f"{path}: RoPE scaling {scaling_type!r} is not supported")
    if "rope_freqs.weight" in tensors:
        # Llama 3.1 GGUFs store the llama3 scaling as per-frequency divisors; they are not read back.
        raise ConversionError(f"{path}: per-frequency RoPE factors (rope_freqs) are not supported")
    args = ModelArgs(dim=dim, n_layers=int(gguf_value(reader, "llama.block_count")), n_heads=n_heads,
                     n_kv_heads=n_kv_heads, head_dim=head_dim,
                     intermediate_size=int(gguf_value(reader, "llama.feed_forward_length")),
                     vocab_size=vocab_size,
                     norm_eps=float(gguf_value(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
                     rope_base=float(gguf_value(reader, "llama.rope.freq_base", 10000.0)),
                     rope_scaling=rope_scaling,
                     max_seq_len=max_seq_len or int(gguf_value(reader, "llama.context_length", 2048)),
                     tie_embeddings="output.weight" not in tensors, attention_bias="blk.0.attn_q.bias" in tensors)
    names = {"embed": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight",
             "q": "blk.{}.attn_q.weight", "k": "blk.{}.attn_k.weight", "v": "blk.{}.attn_v.weight",
             "o": "blk.{}.attn_output.weight", "q_bias": "blk.{}.attn_q.bias", "k_bias": "blk.{}.attn_k.bias",
             "v_bias": "blk.{}.attn_v.bias", "gate": "blk.{}.ffn_gate.weight", "up": "blk.{}.ffn_up.weight",
             "down": "blk.{}.ffn_down.weight", "attn_norm": "blk.{}.attn_norm.weight",
             "ffn_norm": "blk.{}.ffn_norm.weight"}

    def get(key, layer=None):
        t = tensors.get(names[key].format(layer))
        if t is None:
            return None
        # GGUF lists dimensions innermost first; dequantize gives float32 rows of the innermost one.
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(shape)
        if key.startswith("q") or key.startswith("k"):  # llama.cpp stores q/k with interleaved RoPE pairs
            w = interleaved_to_half(w, n_heads if key.startswith("q") else n_kv_heads)
        return w

    return args, get, lambda out: write_gguf_tokenizer(reader, path, out)


GGUF_TOKEN_NORMAL, GGUF_TOKEN_UNKNOWN, GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER, GGUF_TOKEN_UNUSED, GGUF_TOKEN_BYTE = range(1, 7)

# llama.cpp's pre-tokenizer names for byte-level BPE vocabularies, as `tokenizers` pre-tokenizers.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def bpe_pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers as pt
    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("default", "gpt2", "gpt-2", None):
        return pt.Sequence([pt.Split(Regex(GPT2_SPLIT), behavior="isolated"), byte_level])
    if pre in ("smollm", "starcoder", "refact"):
        return pt.Sequence([pt.Digits(individual_digits=True), pt.Split(Regex(GPT2_SPLIT), behavior="isolated"),
                            byte_level])
    if pre in ("llama3", "llama-bpe", "smaug-bpe"):
        return pt.Sequence([pt.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), byte_level])
    if pre == "qwen2":
        return pt.Sequence([pt.Split(Regex(QWEN2_SPLIT), behavior="isolated"), byte_level])
    raise ConversionError(f"GGUF pre-tokenizer {pre!r} is not supported "
                          "(default, gpt2, smollm, starcoder, llama-bpe, qwen2 are)")


def write_gguf_tokenizer(reader, path, out):
    model = gguf_value(reader, "tokenizer.ggml.model")
    tokens = gguf_value(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ConversionError(f"{path}: the GGUF holds no tokenizer vocabulary")
    types = gguf_value(reader, "tokenizer.ggml.token_type") or [GGUF_TOKEN_NORMAL] * len(tokens)
    bos = gguf_value(reader, "tokenizer.ggml.bos_token_id")
    eos = gguf_value(reader, "tokenizer.ggml.eos_token_id")
    if model == "gpt2":
        from tokenizers import AddedToken, Tokenizer, decoders, models
        merges = [tuple(m.split(" ", 1)) for m in gguf_value(reader, "tokenizer.ggml.merges") or []]
        pre = gguf_value(reader, "tokenizer.ggml.pre", "default")
        tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                  ignore_merges=pre in ("llama3", "llama-bpe", "smaug-bpe")))
        tk.pre_tokenizer = bpe_pre_tokenizer(pre)
        tk.decoder = decoders.ByteLevel()
        tk.add_tokens([AddedToken(t, special=ty == GGUF_TOKEN_CONTROL, normalized=False)
                       for t, ty in zip(tokens, types) if ty in (GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER)])
        tk.save(os.path.join(out, "tokenizer.json"))
        add_bos_default = False
    elif model == "llama":
        from sentencepiece import sentencepiece_model_pb2 as pb
        proto = pb.ModelProto()
        proto.trainer_spec.model_type = pb.TrainerSpec.BPE
        proto.trainer_spec.vocab_size = len(tokens)
        proto.trainer_spec.byte_fallback = GGUF_TOKEN_BYTE in types
        proto.trainer_spec.split_digits = True
        proto.trainer_spec.unk_id = int(gguf_value(reader, "tokenizer.ggml.unknown_token_id", 0))
        proto.trainer_spec.bos_id = -1 if bos is None else int(bos)
        proto.trainer_spec.eos_id = -1 if eos is None else int(eos)
        proto.trainer_spec.pad_id = -1
        proto.normalizer_spec.name = "identity"
        proto.normalizer_spec.add_dummy_prefix = bool(gguf_value(reader, "tokenizer.ggml.add_space_prefix", True))
        proto.normalizer_spec.remove_extra_whitespaces = False
        proto.normalizer_spec.escape_whitespaces = True
        scores = gguf_value(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        kinds = {GGUF_TOKEN_NORMAL: pb.ModelProto.SentencePiece.NORMAL,
                 GGUF_TOKEN_UNKNOWN: pb.ModelProto.SentencePiece.UNKNOWN,
                 GGUF_TOKEN_CONTROL: pb.ModelProto.SentencePiece.CONTROL,
                 GGUF_TOKEN_USER: pb.ModelProto.SentencePiece.USER_DEFINED,
                 GGUF_TOKEN_UNUSED: pb.ModelProto.SentencePiece.UNUSED,
                 GGUF_TOKEN_BYTE: pb.ModelProto.SentencePiece.BYTE}
        for token, score, kind in zip(tokens, scores, types):
            piece = proto.pieces.add()
            piece.piece, piece.score, piece.type = token, float(score), kinds.get(int(kind), kinds[1])
        with open(os.path.join(out, "tokenizer.model"), "wb") as f:
            f.write(proto.SerializeToString())
        add_bos_default = True
    else:
        raise ConversionError(f"{path}: GGUF tokenizer model {model!r} is not supported (gpt2, llama are)")
    config = {"add_bos_token": bool(gguf_value(reader, "tokenizer.ggml.add_bos_token", add_bos_default)),
              "bos_token": tokens[bos] if bos is not None else None,
              "eos_token": tokens[eos] if eos is not None else None,
              "chat_template": gguf_value(reader, "tokenizer.chat_template")}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


# ---------------------------------------------------------------------------------------------------------
# llama2.c: a header of seven int32 then float32 weights (version 0, what run.c reads),
# or the versioned "ak42" format (version 1: float32, 256-byte header).


def read_llama2c(path: str, tokenizer=None, max_seq_len=None):
    import numpy as np
    with open(path, "rb") as f:
        head = f.read(256)
    if len(head) < 28:
        raise ConversionError(f"{path}: too short for a llama2.c header")
    magic, version = struct.unpack("<Ii", head[:8])
    if magic == 0x616B3432:
        if version != 1:
            raise ConversionError(f"{path}: llama2.c format version {version} is not supported (0 and 1 are)")
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = struct.unpack("<7i", head[8:36])
        shared = bool(head[36])
        offset = 256
    else:
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = struct.unpack("<7i", head[:28])
        shared, vocab_size = vocab_size > 0, abs(vocab_size)
        offset = 28
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab_size, seq_len) <= 0 or dim % n_heads:
        raise ConversionError(f"{path}: not a llama2.c checkpoint (implausible header)")
    data = np.memmap(path, dtype=np.float32, mode="r", offset=offset, shape=((os.path.getsize(path) - offset) // 4,))
    head_dim, kv_dim = dim // n_heads, dim // n_heads * n_kv_heads
    matrices = [("q", (n_layers, dim, dim)), ("k", (n_layers, kv_dim, dim)), ("v", (n_layers, kv_dim, dim)),
                ("o", (n_layers, dim, dim))]
    ffn = [("gate", (n_layers, hidden, dim)), ("down", (n_layers, dim, hidden)), ("up", (n_layers, hidden, dim))]
    if offset == 256:  # version 1: all norms first, no RoPE tables
        shapes = [("attn_norm", (n_layers, dim)), ("ffn_norm", (n_layers, dim)), ("norm", (dim,)),
                  ("embed", (vocab_size, dim))] + matrices + ffn
    else:
        shapes = ([("embed", (vocab_size, dim)), ("attn_norm", (n_layers, dim))] + matrices
                  + [("ffn_norm", (n_layers, dim))] + ffn + [("norm", (dim,)), ("rope_tables", (seq_len, head_dim))])
    if not shared:
        shapes.append(("lm_head", (vocab_size, dim)))
    arrays, pos = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        if pos + n > data.size:
            raise ConversionError(f"{path}: truncated llama2.c file (ends inside {name})")
        arrays[name] = data[pos:pos + n].reshape(shape)
        pos += n
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                     intermediate_size=hidden, vocab_size=vocab_size, norm_eps=1e-5, rope_base=10000.0,
                     max_seq_len=max_seq_len or seq_len, tie_embeddings=shared, attention_bias=False)

    def get(key, layer=None):
        if key not in arrays:
            return None
        w = torch.from_numpy(np.array(arrays[key] if layer is None else arrays[key][layer]))
        if key in ("q", "k"):  # llama2.c's model.py rotates interleaved pairs
            w = interleaved_to_half(w, n_heads if key == "q" else n_kv_heads)
        return w

    tokenizer = tokenizer or os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer.model")

    def write_tokenizer(out):
        if not os.path.exists(tokenizer):
            raise ConversionError(f"{path}: no tokenizer.model beside it; give one with --tokenizer")
        shutil.copy(tokenizer, os.path.join(out, "tokenizer.model"))

    return args, get, write_tokenizer


# ---------------------------------------------------------------------------------------------------------


def detect_source(source: str) -> str:
    if os.path.isdir(source):
        if os.path.exists(os.path.join(source, "config.json")):
            return "hf"
        if os.path.exists(os.path.join(source, "params.json")):
            return "meta"
        raise ConversionError(f"{source}: neither a Hugging Face (config.json) nor a Meta (params.json) directory")
    if not os.path.exists(source):
        raise ConversionError(f"{source}: no such file or directory")
    with open(source, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf"
    if source.endswith(".bin"):
        return "llama2c"
    raise ConversionError(f"{source}: not a GGUF file, a llama2.c .bin file or a checkpoint directory")


def build_state_dict(args: ModelArgs, get, dtype, progress=True) -> dict:
    """Our layout from Hugging Face-named weights: q/k/v and gate/up fused, the tied head dropped."""
    def need(key, layer=None):
        w = get(key, layer)
        if w is None:
            raise ConversionError(f"missing weight {key!r}" + (f" of layer {layer}" if layer is not None else ""))
        return w

    def cast(w):
        return w.to(dtype).contiguous()

    sd = {"tok_embeddings.weight": cast(need("embed")), "norm.weight": cast(need("norm"))}
    if not args.tie_embeddings:
        sd["output.weight"] = cast(need("lm_head"))
    for i in range(args.n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wqkv.weight"] = cast(torch.cat([need("q", i), need("k", i), need("v", i)]))
        if args.attention_bias:
            sd[p + "attention.wqkv.bias"] = cast(torch.cat([need("q_bias", i), need("k_bias", i), need("v_bias", i)]))
        sd[p + "attention.wo.weight"] = cast(need("o", i))
        sd[p + "feed_forward.w13.weight"] = cast(torch.cat([need("gate", i), need("up", i)]))
        sd[p + "feed_forward.w2.weight"] = cast(need("down", i))
        sd[p + "attention_norm.weight"] = cast(need("attn_norm", i))
        sd[p + "ffn_norm.weight"] = cast(need("ffn_norm", i))
        if progress:
            print(f"\rconverting layer {i + 1}/{args.n_layers}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    check_shapes(args, sd)
    return sd


def check_shapes(args: ModelArgs, sd: dict):
    """Fail here, with the name, rather than at load time, when the weights do not fit the config."""
    qkv = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
    expected = {"tok_embeddings.weight": (args.vocab_size, args.dim), "norm.weight": (args.dim,),
                "output.weight": (args.vocab_size, args.dim),
                "attention.wqkv.weight": (qkv, args.dim), "attention.wqkv.bias": (qkv,),
                "attention.wo.weight": (args.dim, args.n_heads * args.head_dim),
                "feed_forward.w13.weight": (2 * args.intermediate_size, args.dim),
                "feed_forward.w2.weight": (args.dim, args.intermediate_size),
                "attention_norm.weight": (args.dim,), "ffn_norm.weight": (args.dim,)}
    for name, w in sd.items():
        short = name.split(".", 2)[2] if name.startswith("layers.") else name
        if tuple(w.shape) != expected[short]:
            raise ConversionError(f"weight {name} has shape {tuple(w.shape)}, the config implies {expected[short]}")


@contextmanager
def checkpoint_directory(out: str):
    """Yield a temporary directory beside OUT that becomes OUT when the block completes, and is removed
    if it fails or is interrupted: nothing half-written ever looks like a checkpoint."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".writing-", dir=parent)
    try:
        yield tmp
        for name in os.listdir(tmp):  # mkdtemp (and safetensors) make files private; a checkpoint is not
            os.chmod(os.path.join(tmp, name), 0o644)
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert(source: str, out: str, dtype=torch.bfloat16, tokenizer=None, max_seq_len=None, progress=True):
    """Convert SOURCE into the checkpoint directory OUT, which must not exist yet."""
    from dataclasses import asdict
    from safetensors.torch import save_file
    if os.path.exists(out):
        raise ConversionError(f"{out} already exists; remove it or choose another --out")
    kind = detect_source(source)
    if kind == "hf":
        args, get, write_tokenizer = read_hf(source, max_seq_len)
    elif kind == "meta":
        args, get, write_tokenizer = read_meta(source, max_seq_len)
    elif kind == "gguf":
        args, get, write_tokenizer = read_gguf(source, max_seq_len)
    else:
        args, get, write_tokenizer = read_llama2c(source, tokenizer, max_seq_len)
    args.validate()
    with checkpoint_directory(out) as tmp:
        state_dict = build_state_dict(args, get, dtype, progress)
        save_file(state_dict, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        del state_dict
        write_tokenizer(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
    return args


def download_hf_repo(repo: str) -> str:
    """Fetch a Hugging Face repo's config, weights and tokenizer (needs network and huggingface_hub)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConversionError("--hf-repo needs huggingface_hub: pip install huggingface_hub")
    patterns = ["*.json", "*.safetensors", "tokenizer.model"]
    return snapshot_download(repo, allow_patterns=patterns)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", help="HF or Meta directory, .gguf file, or llama2.c .bin file")
    parser.add_argument("--hf-repo", help="download this Hugging Face repo, then convert it")
    parser.add_argument("--out", required=True, help="the checkpoint directory to create")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    parser.add_argument("--tokenizer", help="tokenizer.model for a llama2.c file")
    parser.add_argument("--max-seq-len", type=int, help="override the context length recorded in config.json")
    a = parser.parse_args(argv)
    if a.dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {a.dtype!r} (choose from {', '.join(DTYPES)})")
    if (a.source is None) == (a.hf_repo is None):
        raise ConversionError("give either SOURCE or --hf-repo")
    try:
        source = download_hf_repo(a.hf_repo) if a.hf_repo else a.source
        args = convert(source, a.out, DTYPES[a.dtype], a.tokenizer, a.max_seq_len)
    except (ValueError, OSError) as e:  # a malformed source that the readers did not name themselves
        raise ConversionError(str(e))
    print(f"wrote {a.out}: {args.n_layers} layers, dim {args.dim}, vocab {args.vocab_size}, {a.dtype}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
