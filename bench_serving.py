"""The serving benchmark: the same requests one at a time, in static batches, and through the engine.

    python bench_serving.py                                  # the default model, bfloat16, compiled
    python bench_serving.py --checkpoint DIR --requests 64 --max-num-seqs 32 --concurrency 1,8 --json out.json

N requests with seeded random prompt lengths (16-512 tokens, cut from a real English text: Python's own
help topics) and output lengths (16-256 tokens, end tokens ignored) run in these modes, each in a fresh
process so that compile time and peak memory are its own:
  one-at-a-time   generate(), one request after the other
  static          generate() on batches of --max-num-seqs prompts, left-padded; a batch runs until its
                  longest output is done
  engine          every request added to the engine at once
  engine-cN       the engine with at most N requests in flight (a new one as soon as one ends)
All requests arrive at time 0 (in engine-cN: when the client sends them), so time to first token includes
queueing. Reported: output tok/s, requests/s, time to first token and time per output token (p50, p99),
peak memory, and, for the engine, the share of its KV slots that held tokens.

    python bench_serving.py --url http://127.0.0.1:8000 --model NAME --concurrency 1,4,16,32 --requests 32

With --url, any OpenAI-compatible server (ours, vLLM's, llama.cpp's) gets streamed chat completions
instead: prompts of 20-200 words of the same text, 128 output tokens with end tokens ignored, greedy,
--requests of them at each concurrency; failed requests are counted, not retried.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

from bench import write_json
from checkpoint import default_checkpoint, load_model, load_tokenizer, peak_memory_gb, read_config
from decode import Steps, generate
from engine import Engine
from errors import ArgumentParser, UsageError, run_command
from sampling import SamplingParams


def workload(checkpoint: str, n: int, seed: int = 0) -> list:
    """n (prompt ids, output length) pairs, the same for a given seed."""
    from pydoc_data.topics import topics
    ids = load_tokenizer(checkpoint).encode("\n\n".join(topics[k] for k in sorted(topics))[:400_000])
    g = torch.Generator().manual_seed(seed)
    requests = []
    for _ in range(n):
        p, o = int(torch.randint(16, 513, (1,), generator=g)), int(torch.randint(16, 257, (1,), generator=g))
        start = int(torch.randint(0, len(ids) - p, (1,), generator=g))
        requests.append((ids[start:start + p], o))
    return requests


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


# ---------------------------------------------------------------------------------------------------------
# The modes, each run in its own process. Each returns per-request (arrival, first token, last token, n).


def run_generate(model, steps, requests, batch: int) -> list:
    """generate() on consecutive batches of `batch` requests (1: one at a time)."""
    longest = max(len(p) for p, _ in requests) + max(o for _, o in requests)
    model.setup_caches(batch, -(-longest // 256) * 256)
    times, t0 = [], time.perf_counter()
    for i in range(0, len(requests), batch):
        group = requests[i:i + batch]
        params = SamplingParams(max_tokens=max(o for _, o in group), ignore_eos=True)
        first, last = None, [None] * len(group)
        for step, _ in enumerate(generate(model, [p for p, _ in group] if batch > 1 else group[0][0], params,
                                          steps=steps)):
            now = time.perf_counter() - t0
            first = now if first is None else first
            for j, (_, o) in enumerate(group):
                if step + 1 == o:
                    last[j] = now
        times += [(0.0, first, last[j], o) for j, (_, o) in enumerate(group)]
    return times


def run_engine(engine: Engine, requests, concurrency: int) -> list:
    pending = list(enumerate(requests))
    arrival, first, last, made = {}, {}, {}, {}
    t0 = time.perf_counter()
    while pending or engine.has_unfinished():
        while pending and len(arrival) - len(last) < concurrency:
            i, (prompt, o) = pending.pop(0)
            rid = engine.add_request(prompt, SamplingParams(max_tokens=o, ignore_eos=True), request_id=str(i))
            arrival[rid] = time.perf_counter() - t0 if concurrency < len(requests) else 0.0
        for out in engine.step():
            now = time.perf_counter() - t0
            first.setdefault(out.request_id, now)
            made[out.request_id] = made.get(out.request_id, 0) + len(out.new_token_ids)
            if out.finished:
                last[out.request_id] = now
    return [(arrival[str(i)], first[str(i)], last[str(i)], made[str(i)]) for i in range(len(requests))]


def run_mode(a) -> dict:
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    requests = workload(a.checkpoint, a.requests, a.seed)
    t_setup = time.perf_counter()
    kv_share = None
    if a.mode.startswith("engine"):
        engine = Engine.from_checkpoint(a.checkpoint, device=device, dtype=dtype, max_num_seqs=a.max_num_seqs,
                                        kv_cache_tokens=a.kv_cache_tokens, block_size=a.block_size,
                                        max_num_batched_tokens=a.max_num_batched_tokens, compile=a.compile)
        engine.warm_up()
        setup_s = time.perf_counter() - t_setup
        concurrency = int(a.mode[len("engine-c"):]) if a.mode.startswith("engine-c") else len(requests)
        shares = []
        step = engine.step

        def step_and_measure():  # the share of allocated KV slots holding tokens, weighted by slots
            out = step()
            s = engine.stats()
            shares.append((s["kv_slot_utilization"] * s["kv_blocks_used"], s["kv_blocks_used"]))
            return out
        engine.step = step_and_measure
        t = time.perf_counter()
        times = run_engine(engine, requests, concurrency)
        kv_share = sum(f for f, _ in shares) / max(1, sum(u for _, u in shares))
    else:
        model = load_model(a.checkpoint, device=device, dtype=dtype)
        steps = Steps(model, compile=a.compile)
        batch = 1 if a.mode == "one-at-a-time" else a.max_num_seqs
        run_generate(model, steps, requests[:batch], batch)  # warm-up: compiles with the run's shapes
        setup_s = time.perf_counter() - t_setup
        t = time.perf_counter()
        times = run_generate(model, steps, requests, batch)
        # A static cache holds each batch's texts in rows as long as the longest; its share at best, when
        # every row holds its whole text:
        kv_share = sum(len(p) + o for p, o in requests) / (
            -(-len(requests) // batch) * batch * model.max_seq_length) if batch > 1 else None
    wall = time.perf_counter() - t
    tokens = sum(n for *_, n in times)
    return {"mode": a.mode, "wall_s": wall, "setup_s": setup_s, "output_tokens": tokens,
            "output_tok_s": tokens / wall, "requests_s": len(times) / wall,
            "ttft_p50_s": percentile([f - s for s, f, _, _ in times], 50),
            "ttft_p99_s": percentile([f - s for s, f, _, _ in times], 99),
            "tpot_p50_s": percentile([(l - f) / (n - 1) for _, f, l, n in times if n > 1], 50),
            "tpot_p99_s": percentile([(l - f) / (n - 1) for _, f, l, n in times if n > 1], 99),
            "peak_memory_gb": peak_memory_gb(device), "kv_slot_share": kv_share}


# ---------------------------------------------------------------------------------------------------------
# Over HTTP


def http_load(url: str, model: str, n: int, concurrency: int, seed: int, api_key=None, max_tokens=128) -> dict:
    """n streamed chat completions, at most `concurrency` in flight -> the figures of that run."""
    import random
    import threading
    import urllib.request
    from pydoc_data.topics import topics
    words = " ".join(topics[k] for k in sorted(topics)).split()
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        k, start = rng.randint(20, 200), rng.randrange(len(words) - 200)
        prompts.append("Continue this text:\n" + " ".join(words[start:start + k]))
    results, lock, todo = [], threading.Lock(), list(range(n))

    def one(prompt):
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                           "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                           "stream_options": {"include_usage": True}}).encode()
        req = urllib.request.Request(url.rstrip("/") + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        if api_key:
            req.add_header("Authorization", f"Bearer {api_key}")
        start, first, tokens = time.perf_counter(), None, 0
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                for line in r:
                    if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content") and first is None:
                        first = time.perf_counter()
            return start, first, time.perf_counter(), tokens
        except OSError:
            return None

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            r = one(prompts[i])
            with lock:
                results.append(r)

    t = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    ok = [r for r in results if r is not None and r[1] is not None]
    tokens = sum(r[3] for r in ok)
    return {"concurrency": concurrency, "requests": n, "failed": n - len(ok), "wall_s": wall,
            "output_tokens": tokens, "output_tok_s": tokens / wall,
            "ttft_p50_s": percentile([f - s for s, f, _, _ in ok], 50),
            "ttft_p99_s": percentile([f - s for s, f, _, _ in ok], 99),
            "tpot_p50_s": percentile([(e - f) / (k - 1) for _, f, e, k in ok if k > 1], 50),
            "tpot_p99_s": percentile([(e - f) / (k - 1) for _, f, e, k in ok if k > 1], 99)}


def main_http(a) -> int:
    rows = []
    for c in (int(x) for x in a.concurrency.split(",") if x):
        rows.append(http_load(a.url, a.model, a.requests, c, a.seed, a.api_key))
        x = rows[-1]
        print(f"concurrency {c:>3}: {x['output_tok_s']:7.1f} tok/s, ttft p50 {x['ttft_p50_s']:.2f} s p99 "
              f"{x['ttft_p99_s']:.2f} s, tpot p50 {1e3 * x['tpot_p50_s']:.1f} ms p99 {1e3 * x['tpot_p99_s']:.1f} ms, "
              f"{x['failed']} failed", flush=True)
    write_json(a.json, {"url": a.url, "model": a.model, "rows": rows})
    print(f"results written to {a.json}")
    return 0


# ---------------------------------------------------------------------------------------------------------


def main(argv=None):
    p = ArgumentParser(description="The serving benchmark: one at a time, static batches, the engine.")
    p.add_argument("--checkpoint", help="a converted checkpoint (default: the default model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--kv-cache-tokens", type=int, default=16384)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=256)
    p.add_argument("--concurrency", default="1,8", help="engine runs with at most N requests in flight")
    p.add_argument("--modes", default=None, help="a comma-separated subset of the modes, in this order")
    p.add_argument("--json", default="bench-serving.json", help="where to write the results")
    p.add_argument("--url", help="load an OpenAI-compatible server at this address instead")
    p.add_argument("--model", help="with --url: the model's name there")
    p.add_argument("--api-key", help="with --url: a bearer token")
    p.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode in this process
    a = p.parse_args(argv)
    if a.url:
        if not a.model:
            raise UsageError("--url needs --model NAME")
        return main_http(a)
    a.checkpoint = a.checkpoint or default_checkpoint()
    read_config(a.checkpoint)
    if a.requests < 1 or a.max_num_seqs < 1:
        raise UsageError("--requests and --max-num-seqs must be >= 1")
    if a.mode:  # one mode, in this process: print its JSON
        print(json.dumps(run_mode(a)))
        return 0
    modes = a.modes.split(",") if a.modes else (
        ["one-at-a-time", "static", "engine"] + [f"engine-c{c}" for c in a.concurrency.split(",") if c])
    print(f"{a.requests} requests, {a.checkpoint}, {a.dtype}, {'compiled' if a.compile else 'eager'}, "
          f"max {a.max_num_seqs} running, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for mode in modes:
        args = [sys.executable, os.path.abspath(__file__), "--mode", mode] + (argv if argv is not None else sys.argv[1:])
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode != 0:
            raise UsageError(f"mode {mode} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        x = rows[-1]
        print(f"  {mode}: {x['output_tok_s']:.1f} tok/s", flush=True)
    base = rows[0]["output_tok_s"]
    print(f"{'mode':<15}{'tok/s':>9}{'vs first':>9}{'req/s':>8}{'ttft p50':>10}{'ttft p99':>10}{'tpot p50':>10}"
          f"{'tpot p99':>10}{'peak GB':>9}{'kv share':>9}")
    for x in rows:
        share = f"{100 * x['kv_slot_share']:.1f}%" if x["kv_slot_share"] is not None else "-"
        print(f"{x['mode']:<15}{x['output_tok_s']:>9.1f}{x['output_tok_s'] / base:>8.2f}x{x['requests_s']:>8.2f}"
              f"{x['ttft_p50_s']:>9.2f}s{x['ttft_p99_s']:>9.2f}s{1e3 * x['tpot_p50_s']:>8.1f}ms"
              f"{1e3 * x['tpot_p99_s']:>8.1f}ms{x['peak_memory_gb']:>9.2f}{share:>9}")
    write_json(a.json, {"checkpoint": a.checkpoint, "requests": a.requests, "dtype": a.dtype, "compiled": a.compile,
                        "max_num_seqs": a.max_num_seqs, "threads": torch.get_num_threads(), "rows": rows})
    print(f"results written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
