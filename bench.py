"""The benchmark matrix: dtype x compile x batch size on one checkpoint, against the machine's bandwidth.

    python bench.py                                   # the default model, CPU
    python bench.py --shape llama-1b --device cuda    # random weights in a real model's shape
    python bench.py --checkpoint DIR --dtypes bfloat16 --compile on --batch-sizes 1,8 --json out.json --plot out.png
    python bench.py --checkpoint DIR DIR-int8 DIR-int4 --dtypes bfloat16 --compile on --batch-sizes 1 --repeat 5

Each configuration runs `generate.py --json --ignore-eos` in a fresh process (so compile time and peak
memory are its own), greedy, with a fixed prompt. The machine's read bandwidth is measured in the same
run, so that every speed is also given as a fraction of it: at batch 1 a decode step reads every weight
once, so tok/s x bytes of weights is the bandwidth achieved, and bandwidth / bytes is the ceiling.
Where `transformers` is installed, its eager `generate` on the same weights is added as a baseline row.
Each batch-1 configuration also prefills a prompt of --prefill-tokens tokens (default 512) in its own
process: the prefill column.

Where `llama-cpp-python` is installed (an optional extra: `pip install llama-cpp-python` builds llama.cpp
from source), llama.cpp runs in the same rounds on GGUFs of the same weights at the formats nearest ours:
BF16 (for float weights), Q8_0 (int8) and Q4_0 (int4). When the first checkpoint is the default model's
(its quantized copies may follow), these are requantized by llama.cpp from the model's published GGUF,
once; for other checkpoints give them with --gguf. The ratios printed last: each of our rows against our
bfloat16, against llama.cpp's nearest format, and batch N against batch 1.

Shared machines drift by tens of percent within minutes, so with --repeat N the whole matrix runs N times,
one round after the other, and each row reports its median (and the range). Each ratio is the median of
the rounds' own ratios, both sides measured in the same round (with its range over the rounds), and the
rounds go through the configurations in alternate directions, so that a drift within a round weighs on the
first and the last alike: ratios then hold where single timings do not.
"""
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import torch

from checkpoint import (DEFAULT_NAME, HugePages, build_on_meta, default_checkpoint, default_checkpoint_dir,
                        default_gguf, load_model, load_tokenizer, read_config, weight_bytes_per_token)
from decode import write_whole
from errors import ArgumentParser, UsageError, run_command
from model import ModelArgs, Transformer

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."

# Shapes for random-weight checkpoints: speed does not depend on the values.
SHAPES = {
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, intermediate_size=1536,
                              vocab_size=49152, norm_eps=1e-5, rope_base=100000.0, max_seq_len=8192,
                              tie_embeddings=True, attention_bias=False),
    "llama-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, intermediate_size=8192,
                          vocab_size=128256, norm_eps=1e-5, rope_base=500000.0, max_seq_len=8192,
                          tie_embeddings=True, attention_bias=False),
}


def write_byte_tokenizer(directory, vocab_size=257):
    """A real byte-level BPE tokenizer.json with no merges: every byte is a token, id 0 ends text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        if len(vocab) < vocab_size:
            vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.save(os.path.join(directory, "tokenizer.json"))


def write_random_checkpoint(args: ModelArgs, directory: str, dtype=torch.bfloat16):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = Transformer(args).to(dtype)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (args.tie_embeddings and k == "output.weight")}
    for v in state.values():
        v.normal_(0, 0.02)
    save_file(state, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(asdict(args), f)
    write_byte_tokenizer(directory)


def measure_read_bandwidth(device: torch.device) -> float:
    """GB/s of a sum over a tensor far larger than any cache (1 GiB; 4 GiB on a GPU), best of several; on
    the CPU in huge pages, as load_model puts the weights there."""
    n = (4 << 30 if device.type == "cuda" else 1 << 30) // 4
    if device.type == "cpu" and HugePages.available():
        x = HugePages(n * 4).empty((n,), torch.float32).fill_(1)
    else:
        x = torch.ones(n, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t)
    del x
    return n * 4 / best / 1e9


def write_json(path: str, results: dict):
    """The benchmarks' results file, written whole or not at all."""
    def dump(tmp: str):
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
    write_whole(path, dump)


def weight_bytes(checkpoint: str, dtype: torch.dtype) -> int:
    """Bytes a batch-1 decode step reads, computed as generate.py does, without loading the weights."""
    model = build_on_meta(*read_config(checkpoint))
    for t in model.state_dict(keep_vars=True).values():
        if t.is_floating_point():
            t.data = t.data.to(dtype)
    return weight_bytes_per_token(model)


def run_generate(checkpoint, device, dtype, compiled, batch, new_tokens, prompt=PROMPT):
    """One generate.py process; its first row's figures (tok/s counts every row of the batch)."""
    cmd = [sys.executable, os.path.join(HERE, "generate.py"), "--checkpoint", checkpoint, "--device", device,
           "--dtype", dtype, "--max-new-tokens", str(new_tokens), "--ignore-eos", "--json"]
    cmd += ["--prompt", prompt] * batch + (["--compile"] if compiled else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:8])} failed: {r.stderr.strip().splitlines()[-1:]}")
    records = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    first = records[0]
    return {"steps_s": first["decode_tok_s"], "tok_s": first["decode_tok_s"] * batch, "ttft_s": first["ttft_s"],
            "peak_memory_gb": first["peak_memory_gb"], "compile_s": first["compile_s"],
            "text": first["text"], "prompt_tokens": first["prompt_tokens"], "prefill_tok_s": first["prefill_tok_s"]}


def long_prompt(checkpoint, tokens: int) -> str:
    """About `tokens` tokens of English prose (Python's help topics), for the prefill column."""
    from pydoc_data.topics import topics
    tokenizer = load_tokenizer(checkpoint)
    ids = tokenizer.encode("\n\n".join(topics[k] for k in sorted(topics))[:tokens * 8])[:tokens]
    return tokenizer.decode(ids)


# ---------------------------------------------------------------------------------------------------------
# llama.cpp, the peer

# Our weights -> the nearest GGUF tensor type (float weights: BF16). int4's groups of 32 with a scale and a
# zero are nearer Q4_1, but Q4_0 is the format llama.cpp is fastest at.
GGUF_FORMATS = {"int8": "Q8_0", "int4": "Q4_0"}


def peer_format(weights: str) -> str:
    return GGUF_FORMATS.get(weights.split()[0], "BF16")


def default_model_ggufs() -> dict:
    """{format: path} of the default model requantized by llama.cpp from its published GGUF, once."""
    import ctypes
    import llama_cpp
    source, paths = default_gguf(), {}
    for name in ("BF16", *GGUF_FORMATS.values()):
        paths[name] = os.path.join(os.path.dirname(source), f"{DEFAULT_NAME}.{name}.gguf")
        if not os.path.exists(paths[name]):
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
            params.allow_requantize, params.nthread = True, torch.get_num_threads()
            def quantized(tmp: str):
                if llama_cpp.llama_model_quantize(source.encode(), tmp.encode(), ctypes.byref(params)):
                    raise RuntimeError(f"llama.cpp could not write {paths[name]}")
            write_whole(paths[name], quantized)
    return paths


def gguf_type(path: str) -> str:
    """The tensor type of a GGUF's first layer's largest weight: what its decode step mostly reads."""
    from gguf import GGUFReader
    weights = [t for t in GGUFReader(path).tensors if t.name.startswith("blk.0.") and len(t.shape) == 2]
    return max(weights, key=lambda t: int(t.n_elements)).tensor_type.name


def run_llama_cpp(path, new_tokens, prefill_prompt):
    """llama.cpp in this process on as many threads as PyTorch uses: greedy decode of PROMPT with the end
    token banned, and a prefill of prefill_prompt (its tokens, evaluated in one batch)."""
    import llama_cpp
    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=2048,
                          n_ubatch=512, verbose=False)
    llm.create_completion(PROMPT, max_tokens=4, temperature=0.0)  # warm-up
    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    out = llm.create_completion(PROMPT, max_tokens=new_tokens, temperature=0.0, logit_bias={llm.token_eos(): -1e9})
    perf = llama_cpp.llama_perf_context(llm.ctx)
    ids = llm.tokenize(prefill_prompt.encode(), add_bos=False)
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t
    steps = perf.n_eval / (perf.t_eval_ms / 1e3)
    return {"steps_s": steps, "tok_s": steps, "ttft_s": perf.t_p_eval_ms / 1e3, "peak_memory_gb": None,
            "compile_s": 0.0, "text": out["choices"][0]["text"], "prompt_tokens": len(ids),
            "prefill_tok_s": len(ids) / prefill_s}


def hf_baseline(checkpoint, device, dtype, new_tokens):
    """transformers' eager greedy generate on the same weights (un-fused into its layout), batch 1."""
    try:
        import transformers
    except ImportError:
        return None
    ours = load_model(checkpoint, device=device, dtype=dtype)
    a = ours.args
    config = transformers.LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.intermediate_size,
        num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
        head_dim=a.head_dim, max_position_embeddings=a.max_seq_len, rms_norm_eps=a.norm_eps,
        rope_theta=a.rope_base, tie_word_embeddings=a.tie_embeddings)
    if a.rope_scaling or a.attention_bias:
        return None  # the baseline covers plain Llama shapes only
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    sd = {"model.embed_tokens.weight": ours.tok_embeddings.weight, "model.norm.weight": ours.norm.weight,
          "lm_head.weight": ours.output.weight}
    for i, layer in enumerate(ours.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = layer.attention.wqkv.weight.split([q, kv, kv])
        gate, up = layer.feed_forward.w13.weight.chunk(2)
        sd.update({p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
                   p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": layer.attention.wo.weight,
                   p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                   p + "mlp.down_proj.weight": layer.feed_forward.w2.weight,
                   p + "input_layernorm.weight": layer.attention_norm.weight,
                   p + "post_attention_layernorm.weight": layer.ffn_norm.weight})
    hf = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    hf.load_state_dict(sd, strict=not a.tie_embeddings)
    del ours, sd
    ids = torch.tensor([load_tokenizer(checkpoint).encode(PROMPT)], device=device)

    def timed(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    with torch.inference_mode():
        timed(2)  # warm-up
        first, whole = min(timed(1) for _ in range(3)), timed(new_tokens)  # the first token is the noisier
    steps = (new_tokens - 1) / (whole - first)
    return {"steps_s": steps, "tok_s": steps, "ttft_s": first, "peak_memory_gb": None, "compile_s": 0.0}


def main(argv=None):
    p = ArgumentParser(description="nimblelm benchmark matrix")
    p.add_argument("--checkpoint", nargs="+", help="converted checkpoints, e.g. one and its quantized copies "
                                                  "(default: the default model)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="benchmark random weights of this shape instead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--compile", default="off,on", help="off, on, or off,on")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=1, help="run the matrix N times, interleaved; report medians")
    p.add_argument("--prefill-tokens", type=int, default=512, help="the prefill column's prompt length (0: none)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    p.add_argument("--gguf", nargs="*", help="GGUF files of the same weights for llama.cpp (default: for the "
                                              "default model, made from its GGUF); with none, no llama.cpp")
    p.add_argument("--json", default="bench-results.json", help="where to write the results")
    p.add_argument("--plot", help="draw tok/s against the bandwidth ceiling into this PNG (needs matplotlib)")
    a = p.parse_args(argv)
    if a.repeat < 1 or a.prefill_tokens < 0:
        raise UsageError("--repeat must be >= 1 and --prefill-tokens >= 0")
    for path in a.gguf or []:
        if not os.path.isfile(path):
            raise UsageError(f"--gguf {path}: no such file")
    device = torch.device(a.device)
    tmp = None
    if a.shape:
        tmp = tempfile.TemporaryDirectory()
        checkpoints = [tmp.name]
        write_random_checkpoint(SHAPES[a.shape], tmp.name)
    else:
        checkpoints = a.checkpoint or [default_checkpoint()]
        for checkpoint in checkpoints:
            read_config(checkpoint)  # a directory that is not a checkpoint is refused before any run
    bandwidth = measure_read_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}: measured read bandwidth {bandwidth:.1f} GB/s; checkpoints: {a.shape or ', '.join(checkpoints)}",
          flush=True)

    # what each row's weights are: our quantization ("" for float weights) or a GGUF's tensor type
    scheme = {checkpoint: quantization(checkpoint) for checkpoint in checkpoints}
    prefill_prompt = long_prompt(checkpoints[0], a.prefill_tokens) if a.prefill_tokens else None
    configs = []  # (engine, checkpoint or GGUF, dtype, compiled, batch, weight MB)
    for checkpoint in checkpoints:
        for dtype in a.dtypes.split(","):
            weight_mb = weight_bytes(checkpoint, getattr(torch, dtype)) / 1e6
            configs += [("nimblelm", checkpoint, dtype, c == "on", batch, weight_mb)
                        for c in a.compile.split(",") for batch in map(int, a.batch_sizes.split(","))]
            if not a.no_hf and not scheme[checkpoint]:
                configs.append(("transformers eager", checkpoint, dtype, False, 1, weight_mb))
    for path in peer_ggufs(a, device, checkpoints):
        scheme[path] = gguf_type(path)
        configs.append(("llama.cpp", path, scheme[path], False, 1, os.path.getsize(path) / 1e6))
    runs = {c: [] for c in configs}
    for round_ in range(a.repeat):
        if a.repeat > 1:
            print(f"round {round_ + 1} of {a.repeat}", flush=True)
        for c in configs if round_ % 2 == 0 else configs[::-1]:
            engine, checkpoint, dtype, compiled, batch, _ = c
            if engine == "llama.cpp":
                r = run_llama_cpp(checkpoint, a.max_new_tokens, prefill_prompt or PROMPT)
            elif engine == "transformers eager":
                r = hf_baseline(checkpoint, device, getattr(torch, dtype), a.max_new_tokens)
            else:
                r = run_generate(checkpoint, a.device, dtype, compiled, batch, a.max_new_tokens)
                r["prefill_tok_s"] = None
                if batch == 1 and prefill_prompt:  # a process of its own: the prompt's length sets the cache's
                    long = run_generate(checkpoint, a.device, dtype, compiled, 1, 1, prefill_prompt)
                    r.update(prompt_tokens=long["prompt_tokens"], prefill_tok_s=long["prefill_tok_s"])
            if r:
                runs[c].append(r)
                weights = scheme[checkpoint] or dtype
                label = f"{'compiled' if compiled else 'eager'} batch {batch}" if engine == "nimblelm" else ""
                print(f"  {engine} {weights} {label} ({checkpoint}): {r['tok_s']:.1f} tok/s", flush=True)
    rows = []
    for (engine, checkpoint, dtype, compiled, batch, weight_mb), results in runs.items():
        if not results:
            continue  # no baseline for this model
        rounds = {"round_tok_s": [r["tok_s"] for r in results],  # in the rounds' order, for the ratios
                  "round_prefill_tok_s": [r.get("prefill_tok_s") for r in results]}
        results = sorted(results, key=lambda r: r["steps_s"])
        row = dict(results[len(results) // 2], weight_mb=weight_mb, dtype=dtype, compiled=compiled, engine=engine,
                   batch=batch, weights=scheme[checkpoint] or dtype, checkpoint=checkpoint,
                   tok_s_range=[results[0]["tok_s"], results[-1]["tok_s"]], **rounds)
        prefills = sorted(r["prefill_tok_s"] for r in results if r.get("prefill_tok_s"))
        row["prefill_tok_s"] = prefills[len(prefills) // 2] if prefills else None
        row["bandwidth_gb_s"] = row["steps_s"] * weight_mb / 1e3
        row["fraction_of_bandwidth"] = row["bandwidth_gb_s"] / bandwidth
        row["ceiling_tok_s"] = bandwidth * 1e3 / weight_mb
        rows.append(row)
    print_table(rows, a.repeat > 1)
    ratios = print_ratios(rows)
    write_json(a.json, {"device": name, "read_bandwidth_gb_s": bandwidth, "checkpoints": a.shape or checkpoints,
                        "max_new_tokens": a.max_new_tokens, "prefill_tokens": a.prefill_tokens, "repeat": a.repeat,
                        "rows": rows, "ratios": ratios})
    print(f"results written to {a.json}")
    if a.plot:
        plot(rows, bandwidth, name, a.plot)


def quantization(checkpoint) -> str:
    """The checkpoint's weight scheme ("int4 g32", ...), or "" for float weights."""
    q = read_config(checkpoint)[1]
    return "" if not q else q["mode"] + (f" g{q['groupsize']}" if q.get("groupsize") else "")


def peer_ggufs(a, device, checkpoints) -> list:
    """The GGUFs llama.cpp runs: --gguf's, or the default model's where it is the first checkpoint
    benchmarked (its quantized copies may follow), on the CPU, and llama-cpp-python is installed."""
    if a.gguf == [] or a.gguf is None and (
            a.shape or device.type != "cpu"
            or os.path.realpath(checkpoints[0]) != os.path.realpath(default_checkpoint_dir())):
        return []
    if importlib.util.find_spec("llama_cpp") is None:
        if a.gguf:
            raise UsageError("--gguf runs llama.cpp: pip install llama-cpp-python (it builds from source)")
        return []
    return a.gguf or list(default_model_ggufs().values())


def print_table(rows, with_range):
    print(f"{'engine':<20}{'weights':<11}{'compile':<9}{'batch':>5}{'tok/s':>9}{'range':>14}{'GB/s':>8}"
          f"{'% bw':>7}{'ttft ms':>9}{'prefill':>9}{'peak GB':>9}{'compile s':>11}")
    for r in rows:
        peak = f"{r['peak_memory_gb']:.2f}" if r["peak_memory_gb"] is not None else "-"
        spread = f"{r['tok_s_range'][0]:.1f}-{r['tok_s_range'][1]:.1f}" if with_range else "-"
        prefill = f"{r['prefill_tok_s']:.0f}" if r["prefill_tok_s"] is not None else "-"
        print(f"{r['engine']:<20}{r['weights']:<11}{'on' if r['compiled'] else 'off':<9}{r['batch']:>5}"
              f"{r['tok_s']:>9.1f}{spread:>14}{r['bandwidth_gb_s']:>8.1f}{100 * r['fraction_of_bandwidth']:>6.0f}%"
              f"{r['ttft_s'] * 1e3:>9.0f}{prefill:>9}{peak:>9}{r['compile_s']:>11.1f}", flush=True)


def paired(ours: list, other: list) -> list:
    """The ratios of two rows' figures round by round, where both have one."""
    return [a / b for a, b in zip(ours, other) if a and b]


def print_ratios(rows) -> list:
    """Each of our rows against our bfloat16 (same compile and batch), against llama.cpp's nearest format
    (batch 1), and batch N against batch 1: decode tok/s, and prefill where both have it; the median of the
    rounds' ratios, and their range."""
    ours = {(r["weights"], r["dtype"], r["compiled"], r["batch"]): r for r in rows if r["engine"] == "nimblelm"}
    peers = {r["weights"]: r for r in rows if r["engine"] == "llama.cpp"}
    ratios = []
    for (weights, dtype, compiled, batch), r in ours.items():
        pairs = [("bfloat16", ours.get(("bfloat16", dtype, compiled, batch)))] if weights != "bfloat16" else []
        if batch == 1:
            pairs.append((f"llama.cpp {peer_format(weights)}", peers.get(peer_format(weights))))
        else:
            pairs.append(("batch 1", ours.get((weights, dtype, compiled, 1))))
        for against, other in pairs:
            if other is None:
                continue
            ratio = {"weights": weights, "dtype": dtype, "compiled": compiled, "batch": batch, "against": against}
            said = []
            for figure, key in (("decode", "round_tok_s"), ("prefill", "round_prefill_tok_s")):
                each = paired(r[key], other[key])  # prefill: batch-1 rows have one
                if each:
                    ratio[figure], ratio[figure + "_range"] = statistics.median(each), [min(each), max(each)]
                    spread = f" ({min(each):.2f}-{max(each):.2f})" if len(each) > 1 else ""
                    said.append(f"{figure} {ratio[figure]:.2f}x{spread}")
            ratios.append(ratio)
            print(f"{weights} {'compiled' if compiled else 'eager'} batch {batch} vs {against}: {', '.join(said)}",
                  flush=True)
    return ratios


def plot(rows, bandwidth, name, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    batch1 = [r for r in rows if r["batch"] == 1]
    labels = [f"{r['engine'].split()[0]}\n{r['weights']}\n{'compiled' if r['compiled'] else 'eager'}" for r in batch1]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(batch1)), 4))
    ax.bar(labels, [r["tok_s"] for r in batch1], color="tab:blue")
    for i, r in enumerate(batch1):
        ax.hlines(r["ceiling_tok_s"], i - 0.4, i + 0.4, colors="tab:red")
    ax.set_ylabel("decode tok/s, batch 1")
    ax.set_title(f"{name}: bars measured, red lines the ceiling at {bandwidth:.0f} GB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(run_command(main))
