"""Offloading against residency, in one process: decode speed by batch size, streamed and resident, and
what streaming moves.

    python bench_offload.py                                         # a random 1.1 GB model on the CPU
    python bench_offload.py --checkpoint DIR --max-resident-gb 0.5 --batch-sizes 1,8,32 --prefetch 0,1,2
    python bench_offload.py --shape llama-1b --device cuda --gpu-layers 0 --json offload.json

The same weights run resident (load_model) and streamed (offload.py: --max-resident-gb on the CPU,
--gpu-layers on a GPU) at each prefetch depth, eagerly (streamed layers cannot run in a compiled step, so
the resident model runs eagerly too), over interleaved rounds, each figure the median of its rounds. For
each streamed run: the bytes streamed per step and the bandwidth of the copies, beside the bound that
streaming allows, max(the resident step, streamed bytes / the copy bandwidth measured alone): a large
pinned host-to-device copy on a GPU, a copy out of the page cache (mmap) on the CPU. Where the CPU
computes in place from the mapped file (zero copy: the file holds what runs), a fill only maps a layer's
pages, so its rate is that of mapping, and the bound is the resident step. The file is read from the
page cache when the machine has room for it: on the CPU these are the speeds of memory, not of a disk.
On a GPU the peak memory of each run is printed beside its estimate, non-layer weights plus resident and
buffered layers plus the KV cache.
"""
import mmap
import os
import tempfile
import time

import torch

from bench import SHAPES, measure_read_bandwidth, write_json, write_random_checkpoint
from checkpoint import load_model, pick_device, pick_dtype, read_config
from decode import Steps, generate, synchronize
from errors import ArgumentParser, UsageError, run_command
from model import ModelArgs
from offload import OffloadOptions, load_offloaded, tensor_bytes, tensors_of
from sampling import SamplingParams

# The default: 32 layers of 34 MB in bfloat16, over 1 GB, with a byte-level vocabulary.
STREAM_1G = ModelArgs(dim=1024, n_layers=32, n_heads=8, n_kv_heads=8, head_dim=128, intermediate_size=4096,
                      vocab_size=257, norm_eps=1e-5, rope_base=10000.0, max_seq_len=2048, tie_embeddings=True,
                      attention_bias=False)


def copy_bandwidth(path: str, device: torch.device) -> float:
    """GB/s of the copy streaming makes, alone: 256 MB pinned host to device, or out of the mapped file."""
    if device.type == "cuda":
        src = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty_like(src, device=device)
    else:
        f = open(path, "rb")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        size = min(256 << 20, len(mapped)) // mmap.PAGESIZE * mmap.PAGESIZE
        src, dst = torch.frombuffer(mapped, dtype=torch.uint8)[:size], torch.empty(size, dtype=torch.uint8)
    best = float("inf")
    for _ in range(5):
        if device.type == "cpu":
            mapped.madvise(mmap.MADV_DONTNEED, 0, size)  # out of this process, still in the page cache
        synchronize(device)
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return src.numel() / best / 1e9


def decode_rate(model, batch: int, new_tokens: int, device) -> dict:
    """Decode steps per second of a batch of identical prompts (the first step, prefill, left out)."""
    prompt = list(range(1, 17))
    model.setup_caches(batch, -(-(len(prompt) + new_tokens) // 256) * 256)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps, times = Steps(model), []
    for _ in generate(model, [prompt] * batch, SamplingParams(max_tokens=new_tokens, ignore_eos=True), steps=steps):
        synchronize(device)
        times.append(time.perf_counter())
    step_s = (times[-1] - times[0]) / (len(times) - 1)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {"step_ms": step_s * 1e3, "tok_s": batch / step_s, "peak_device_gb": peak}


def main(argv=None):
    p = ArgumentParser(description="nimblelm offloading benchmark")
    p.add_argument("--checkpoint", help="a converted checkpoint (default: random weights of --shape)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape (default: 32 layers, 1.1 GB)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-resident-gb", type=float, help="the CPU budget (default: a quarter of the layers resident "
                                                         "beside those in flight)")
    p.add_argument("--gpu-layers", type=int, default=0, help="layers resident on a GPU")
    p.add_argument("--prefetch", default="0,1,2")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default="offload-results.json")
    a = p.parse_args(argv)
    try:
        prefetches = [int(x) for x in a.prefetch.split(",")]
        batches = [int(x) for x in a.batch_sizes.split(",")]
    except ValueError:
        raise UsageError("--prefetch and --batch-sizes take comma-separated integers")
    if a.rounds < 1 or a.max_new_tokens < 2 or min(batches) < 1 or min(prefetches) < 0:
        raise UsageError("--rounds and batch sizes must be >= 1, --max-new-tokens >= 2, prefetch depths >= 0")
    device = pick_device(a.device)
    dtype = pick_dtype(a.dtype, device)
    tmp = None
    if a.checkpoint:
        checkpoint = a.checkpoint
        read_config(checkpoint)
    else:
        tmp = tempfile.TemporaryDirectory()
        checkpoint = tmp.name
        write_random_checkpoint(SHAPES[a.shape] if a.shape else STREAM_1G, checkpoint)
    weights_path = os.path.join(checkpoint, "model.safetensors")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"

    resident = load_model(checkpoint, device=device, dtype=dtype)
    layer_bytes = tensor_bytes(tensors_of(resident.layers[0]).values())
    n_layers = resident.args.n_layers
    largest = max(t.numel() * t.element_size() for t in tensors_of(resident.layers[0]).values())
    budget = a.max_resident_gb or ((max(prefetches) + 1 + n_layers // 4) * layer_bytes + largest) / 1e9
    models = {"resident": resident}
    for depth in prefetches:
        options = (OffloadOptions(prefetch=depth, gpu_layers=a.gpu_layers) if device.type == "cuda"
                   else OffloadOptions(prefetch=depth, max_resident_gb=budget))
        models[f"prefetch {depth}"] = load_offloaded(checkpoint, device, dtype, options)
    memory_bw, copy_bw = measure_read_bandwidth(device), copy_bandwidth(weights_path, device)
    print(f"{name}: {n_layers} layers of {layer_bytes / 1e6:.1f} MB ({dtype}); read bandwidth {memory_bw:.1f} GB/s; "
          f"streaming copy alone {copy_bw:.1f} GB/s", flush=True)

    runs = {(label, b): [] for label in models for b in batches}
    for round_ in range(a.rounds):
        for b in batches:
            for label, model in models.items():
                offload = getattr(model, "offload", None)
                before = offload.stats() if offload else None
                r = decode_rate(model, b, a.max_new_tokens, device)
                if offload:
                    now = offload.stats()
                    r["transfer_gb_s"] = (now["bytes_moved"] - before["bytes_moved"]) / 1e9 / max(
                        now["copy_seconds"] - before["copy_seconds"], 1e-9)
                runs[(label, b)].append(r)
        print(f"round {round_ + 1} of {a.rounds} done", flush=True)

    rows = []
    for (label, b), results in runs.items():
        results.sort(key=lambda r: r["tok_s"])
        row = dict(results[len(results) // 2], mode=label, batch=b, tok_s_range=[results[0]["tok_s"],
                                                                                  results[-1]["tok_s"]])
        offload = getattr(models[label], "offload", None)
        if offload:
            stats = offload.stats()
            resident_row = next(r for r in rows if r["mode"] == "resident" and r["batch"] == b)
            row.update(resident_layers=stats["resident_layers"], streamed_layers=stats["streamed_layers"],
                       streamed_mb_per_step=stats["bytes_per_pass"] / 1e6, zero_copy=stats["zero_copy"])
            # In place (zero copy), a streamed step reads the page cache as a resident one reads memory.
            copy_ms = 0.0 if stats["zero_copy"] else stats["bytes_per_pass"] / copy_bw / 1e6
            bound_ms = max(resident_row["step_ms"], copy_ms)
            row.update(bound_ms=bound_ms, of_bound=row["step_ms"] / bound_ms,
                       vs_resident=row["tok_s"] / resident_row["tok_s"])
            if device.type == "cuda":
                non_layer = tensor_bytes([t for n, t in models[label].state_dict().items()
                                          if not n.startswith("layers.")])
                kv = sum(tensor_bytes([blk.attention.kv_cache.k_cache, blk.attention.kv_cache.v_cache])
                         for blk in models[label].layers)
                row["estimated_device_gb"] = (non_layer + kv + (stats["resident_layers"] + stats["prefetch"] + 1)
                                              * layer_bytes) / 1e9
        rows.append(row)

    print(f"\n{'mode':<12} {'batch':>5} {'tok/s':>9} {'step ms':>9} {'streamed MB':>12} {'fill GB/s':>10} "
          f"{'x resident':>10} {'x bound':>8}")
    for r in rows:
        streamed = "streamed_mb_per_step" in r
        print(f"{r['mode']:<12} {r['batch']:>5} {r['tok_s']:>9.1f} {r['step_ms']:>9.1f} "
              f"{r['streamed_mb_per_step'] if streamed else 0:>12.1f} {r.get('transfer_gb_s', 0):>10.2f} "
              f"{r.get('vs_resident', 1):>10.2f} {r.get('of_bound', 1):>8.2f}"
              + (f"  peak {r['peak_device_gb']:.2f} GB (estimate {r['estimated_device_gb']:.2f})"
                 if streamed and r["peak_device_gb"] is not None else ""))
    write_json(a.json, {"device": name, "dtype": str(dtype), "checkpoint": a.checkpoint or a.shape or "random 1.1 GB",
                        "layer_bytes": layer_bytes, "n_layers": n_layers, "max_resident_gb": budget,
                        "read_bandwidth_gb_s": memory_bw, "copy_bandwidth_gb_s": copy_bw,
                        "rounds": a.rounds, "max_new_tokens": a.max_new_tokens, "rows": rows})
    print(f"results written to {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
