"""Beam search on one model, in one process: its speed against greedy decoding of as many rows, and what
the pruning options change and save.

    python bench_beam.py                                   # the default model, bfloat16, compiled
    python bench_beam.py --checkpoint DIR --num-beams 4 --rounds 5 --json beam.json

Speed: K beams of one prompt against greedy decoding of a batch of K copies of it, the same number of
rows per step through the same compiled step, in interleaved rounds; both run max_new_tokens steps (no
end token). Beam search adds its choice of beams and the reordering of cache rows; the bytes that moves
are printed beside the bytes of weights a step reads.

Pruning: each prompt searched alone, without pruning and with each setting of Freitag and Al-Onaizan's
(2017) options: how many best hypotheses change, and the steps and time saved. On a static batch pruning
saves time only by ending a search early: pruned beams still occupy their rows until it ends.
"""
import json
import statistics
import sys
import time
from dataclasses import replace

import torch

from beam import BeamParams, BeamSteps, beam_search
from checkpoint import default_checkpoint, load_model, load_tokenizer, pick_device, weight_bytes_per_token
from decode import Steps, generate
from errors import ArgumentParser, UsageError, run_command
from sampling import SamplingParams

STORY = "Write a long story about a lighthouse keeper who finds a message in a bottle."
QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "How do plants make food?",
             "What is 12 times 7?", "Translate 'good morning' into Spanish.", "Who wrote Romeo and Juliet?",
             "Give me a synonym for happy.", "What does a CPU do?", "Why is the sky blue?",
             "Suggest a name for a pet cat.", "What is the boiling point of water?", "Summarise the water cycle.",
             "How many legs does a spider have?", "What language is spoken in Brazil?",
             "Give one tip for better sleep.", "What is photosynthesis?"]
# The paper's settings, each alone and all together.
PRUNING = {"rel 0.6": dict(rel_threshold=0.6), "abs 2.5": dict(abs_threshold=2.5),
           "local 0.02": dict(local_threshold=0.02), "max-cand 3": dict(max_candidates=3),
           "all four": dict(rel_threshold=0.6, abs_threshold=2.5, local_threshold=0.02, max_candidates=3)}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def speed(model, tok, K: int, new: int, rounds: int, compile: bool) -> dict:
    prompt = tok.encode_chat([{"role": "user", "content": STORY}])
    model.setup_caches(K, -(-(len(prompt) + new) // 256) * 256)
    greedy_steps, beam_steps = Steps(model, compile=compile), BeamSteps(model, compile=compile)
    greedy_params = SamplingParams(max_tokens=new, ignore_eos=True)
    beam_params = BeamParams(num_beams=K, max_tokens=new)
    stats = {}

    def greedy():
        for _ in generate(model, [prompt] * K, greedy_params, steps=greedy_steps):
            pass

    def beams():
        beam_search(model, prompt, beam_params, steps=beam_steps, stats=stats)

    greedy(), beams()  # compile
    times = {"greedy": [], "beam": []}
    for _ in range(rounds):
        times["greedy"].append(timed(greedy))
        times["beam"].append(timed(beams))
    g, b = statistics.median(times["greedy"]), statistics.median(times["beam"])
    return {"rows": K, "steps": new, "greedy_tok_s": K * new / g, "beam_tok_s": K * stats["steps"] / b,
            "beam_over_greedy": (K * stats["steps"] / b) / (K * new / g), "rounds_s": times,
            "reorder_bytes_per_step": stats["reorder_bytes"] / stats["steps"],
            "reordered_rows_per_step": stats["reordered_rows"] / stats["steps"],
            "weight_bytes_per_step": weight_bytes_per_token(model)}


def pruning(model, tok, K: int, new: int, compile: bool) -> dict:
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    model.setup_caches(K, -(-(max(map(len, prompts)) + new) // 256) * 256)
    steps = BeamSteps(model, compile=compile)
    base = BeamParams(num_beams=K, max_tokens=new)
    beam_search(model, prompts[0], base, eos_ids=tok.eos_ids, steps=steps)  # compile
    configs = {"none": base, **{name: replace(base, **option) for name, option in PRUNING.items()}}
    out = {name: {"best": [], "scores": [], "steps": 0, "seconds": 0.0} for name in configs}
    for prompt in prompts:  # every setting on one prompt, then the next: drift falls on all alike
        for name, params in configs.items():
            stats = {}
            t0 = time.perf_counter()
            best = beam_search(model, prompt, params, eos_ids=tok.eos_ids, steps=steps, stats=stats)[0]
            row = out[name]
            row["seconds"] += time.perf_counter() - t0
            row["steps"] += stats["steps"]
            row["best"].append(best.token_ids)
            row["scores"].append(best.score)
    for name in PRUNING:
        row = out[name]
        row["changed"] = sum(a != b for a, b in zip(row["best"], out["none"]["best"]))
        row["steps_saved"] = 1 - row["steps"] / out["none"]["steps"]
        row["time_saved"] = 1 - row["seconds"] / out["none"]["seconds"]
        row["score_loss"] = statistics.mean(n - p for n, p in zip(out["none"]["scores"], row["scores"]))
    return out


def main(argv=None):
    p = ArgumentParser(description="Beam search: speed against greedy decoding, and what pruning does.")
    p.add_argument("--checkpoint", help="converted checkpoint (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the speed comparison")
    p.add_argument("--no-compile", action="store_true", help="eager steps (for a quick check, not for figures)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.num_beams < 1 or a.rounds < 1 or a.max_new_tokens < 2:
        raise UsageError("--num-beams and --rounds must be >= 1, --max-new-tokens >= 2")
    checkpoint = a.checkpoint or default_checkpoint()
    model = load_model(checkpoint, device=pick_device("cpu"), dtype=getattr(torch, a.dtype))
    tok = load_tokenizer(checkpoint)
    s = speed(model, tok, a.num_beams, a.max_new_tokens, a.rounds, not a.no_compile)
    mode = "eager" if a.no_compile else "compiled"
    print(f"{a.num_beams} rows x {a.max_new_tokens} steps, {a.dtype}, {mode}: greedy {s['greedy_tok_s']:.1f} tok/s, "
          f"beam search {s['beam_tok_s']:.1f} tok/s ({s['beam_over_greedy']:.2f}x) | per step: reordering "
          f"{s['reorder_bytes_per_step'] / 1e6:.2f} MB ({s['reordered_rows_per_step']:.2f} rows), weights "
          f"{s['weight_bytes_per_step'] / 1e6:.1f} MB")
    r = pruning(model, tok, a.num_beams, 48, not a.no_compile)
    print(f"pruning, {len(QUESTIONS)} chat prompts, {a.num_beams} beams, up to 48 tokens: none "
          f"{r['none']['steps']} steps, {r['none']['seconds']:.2f} s")
    for name in PRUNING:
        row = r[name]
        print(f"  {name:<11} best changed {row['changed']}/{len(QUESTIONS)}, steps {row['steps']} "
              f"({row['steps_saved']:.0%} fewer), time {row['seconds']:.2f} s ({row['time_saved']:.0%} less), "
              f"best score {row['score_loss']:+.4f} below unpruned on average")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"speed": s, "pruning": {k: {x: y for x, y in v.items() if x != "best"} for k, v in r.items()}},
                      f, indent=1)
        print(f"written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
