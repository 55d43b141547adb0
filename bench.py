"""The benchmark matrix: dtype x compile x batch size on one checkpoint, against the machine's bandwidth.

    python bench.py                                   # the default model, CPU
    python bench.py --shape llama-1b --device cuda    # random weights in a real model's shape
    python bench.py --checkpoint DIR --dtypes bfloat16 --compile on --batch-sizes 1,8 --json out.json --plot out.png

Each configuration runs `generate.py --json --ignore-eos` in a fresh process (so compile time and peak
memory are its own), greedy, with a fixed prompt. The machine's read bandwidth is measured in the same
run, so that every speed is also given as a fraction of it: at batch 1 a decode step reads every weight
once, so tok/s x bytes of weights is the bandwidth achieved, and bandwidth / bytes is the ceiling.
Where `transformers` is installed, its eager `generate` on the same weights is added as a baseline row.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import torch

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
    """GB/s of a sum over a tensor far larger than any cache (1 GiB; 4 GiB on a GPU), best of several."""
    n = (4 << 30 if device.type == "cuda" else 1 << 30) // 4
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


def weight_bytes(checkpoint: str, dtype: torch.dtype) -> int:
    """Bytes a batch-1 decode step reads, computed as generate.py does, without loading the weights."""
    from generate import build_on_meta, weight_bytes_per_token
    with open(os.path.join(checkpoint, "config.json")) as f:
        config = json.load(f)
    model = build_on_meta(ModelArgs.from_dict(config), config.get("quantization"))
    for t in model.state_dict(keep_vars=True).values():
        if t.is_floating_point():
            t.data = t.data.to(dtype)
    return weight_bytes_per_token(model)


def run_generate(checkpoint, device, dtype, compiled, batch, new_tokens):
    cmd = [sys.executable, os.path.join(HERE, "generate.py"), "--checkpoint", checkpoint, "--device", device,
           "--dtype", dtype, "--max-new-tokens", str(new_tokens), "--ignore-eos", "--json"]
    cmd += ["--prompt", PROMPT] * batch + (["--compile"] if compiled else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed: {r.stderr.strip().splitlines()[-1:]}")
    records = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    first = records[0]
    return {"steps_s": first["decode_tok_s"], "tok_s": first["decode_tok_s"] * batch, "ttft_s": first["ttft_s"],
            "peak_memory_gb": first["peak_memory_gb"], "compile_s": first["compile_s"],
            "text": first["text"]}


def hf_baseline(checkpoint, device, dtype, new_tokens):
    """transformers' eager greedy generate on the same weights (un-fused into its layout), batch 1."""
    try:
        import transformers
    except ImportError:
        return None
    from generate import load_model
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
    from tokenizer import get_tokenizer
    ids = torch.tensor([get_tokenizer(checkpoint).encode(PROMPT)], device=device)

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
        first, whole = timed(1), timed(new_tokens)
    steps = (new_tokens - 1) / (whole - first)
    return {"steps_s": steps, "tok_s": steps, "ttft_s": first, "peak_memory_gb": None, "compile_s": 0.0}


def main(argv=None):
    p = argparse.ArgumentParser(description="nimblelm benchmark matrix")
    p.add_argument("--checkpoint", help="a converted checkpoint (default: the default model)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="benchmark random weights of this shape instead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--compile", default="off,on", help="off, on, or off,on")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    p.add_argument("--json", default="bench-results.json", help="where to write the results")
    p.add_argument("--plot", help="draw tok/s against the bandwidth ceiling into this PNG (needs matplotlib)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    tmp = None
    if a.shape:
        tmp = tempfile.TemporaryDirectory()
        checkpoint = tmp.name
        write_random_checkpoint(SHAPES[a.shape], checkpoint)
    else:
        from generate import default_checkpoint
        checkpoint = a.checkpoint or default_checkpoint()
    bandwidth = measure_read_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}: measured read bandwidth {bandwidth:.1f} GB/s; checkpoint {a.shape or checkpoint}", flush=True)

    rows = []
    for dtype in a.dtypes.split(","):
        bytes_per_step = weight_bytes(checkpoint, getattr(torch, dtype))
        for compiled in [c == "on" for c in a.compile.split(",")]:
            for batch in map(int, a.batch_sizes.split(",")):
                r = run_generate(checkpoint, a.device, dtype, compiled, batch, a.max_new_tokens)
                rows.append(dict(r, engine="nimblelm", dtype=dtype, compiled=compiled, batch=batch,
                                 weight_mb=bytes_per_step / 1e6))
                print_row(rows[-1], bandwidth, flush_header=len(rows) == 1)
        if not a.no_hf:
            r = hf_baseline(checkpoint, device, getattr(torch, dtype), a.max_new_tokens)
            if r:
                rows.append(dict(r, engine="transformers eager", dtype=dtype, compiled=False, batch=1,
                                 weight_mb=bytes_per_step / 1e6))
                print_row(rows[-1], bandwidth)
    for r in rows:
        r["bandwidth_gb_s"] = r["steps_s"] * r["weight_mb"] / 1e3
        r["fraction_of_bandwidth"] = r["bandwidth_gb_s"] / bandwidth
        r["ceiling_tok_s"] = bandwidth * 1e3 / r["weight_mb"]
    with open(a.json, "w") as f:
        json.dump({"device": name, "read_bandwidth_gb_s": bandwidth, "checkpoint": a.shape or checkpoint,
                   "max_new_tokens": a.max_new_tokens, "rows": rows}, f, indent=2)
    print(f"results written to {a.json}")
    if a.plot:
        plot(rows, bandwidth, name, a.plot)


def print_row(r, bandwidth, flush_header=False):
    if flush_header:
        print(f"{'engine':<20}{'dtype':<10}{'compile':<9}{'batch':>5}{'tok/s':>9}{'GB/s':>8}{'% bw':>7}"
              f"{'ttft ms':>9}{'peak GB':>9}{'compile s':>11}")
    gbs = r["steps_s"] * r["weight_mb"] / 1e3
    peak = f"{r['peak_memory_gb']:.2f}" if r["peak_memory_gb"] is not None else "-"
    print(f"{r['engine']:<20}{r['dtype']:<10}{'on' if r['compiled'] else 'off':<9}{r['batch']:>5}"
          f"{r['tok_s']:>9.1f}{gbs:>8.1f}{100 * gbs / bandwidth:>6.0f}%{r['ttft_s'] * 1e3:>9.0f}{peak:>9}"
          f"{r['compile_s']:>11.1f}", flush=True)


def plot(rows, bandwidth, name, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    batch1 = [r for r in rows if r["batch"] == 1]
    labels = [f"{r['engine'].split()[0]}\n{r['dtype']}\n{'compiled' if r['compiled'] else 'eager'}" for r in batch1]
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
    main()
