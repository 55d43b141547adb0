"""Speculative decoding against plain decoding of the same target, in one process: decode tok/s, the
ratio per round, and how many proposals the target kept.

    python bench_speculative.py --draft-checkpoint DIR-int4                 # the default model, bfloat16
    python bench_speculative.py --checkpoint DIR --draft-checkpoint DIR-int4 --k 2,3,4 --rounds 5 --json s.json
    python bench_speculative.py --draft ngram --k 8 --prompt "Repeat this text: ..."

Each round runs plain decoding and speculative decoding at every k, greedy, on one chat prompt (by default
the story prompt of bench.py), max_new_tokens new tokens with no end token, in an order that rotates from
round to round; each method's tok/s is timed from its first new token to its last (the prompt's pass
excluded), as generate.py reports decode speed. Ratios are taken within a round, whose runs are seconds
apart, and summarised by their median: between rounds this machine's speed drifts by more than the
difference being measured. The compiled steps are built before the first round.
"""
import statistics
import sys
import time

import torch

from bench import write_json
from checkpoint import default_checkpoint, load_model, load_tokenizer, pick_device
from decode import generate
from errors import ArgumentParser, UsageError, run_command
from sampling import SamplingParams
from speculative import SpeculativeSteps, speculative_generate

STORY = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def decode_tok_s(tokens) -> tuple:
    """Run a token iterator to its end: (its tokens, tok/s from the first token to the last)."""
    out, first = [], None
    for t in tokens:
        out.append(t)
        if first is None:
            first = time.perf_counter()
    return out, (len(out) - 1) / max(time.perf_counter() - first, 1e-9)


def main(argv=None):
    p = ArgumentParser(description="Speculative decoding against plain decoding, interleaved rounds, one process.")
    p.add_argument("--checkpoint", help="the target's converted checkpoint (default: SmolLM2-135M-Instruct)")
    p.add_argument("--draft-checkpoint", help="the draft model's checkpoint (e.g. a quantized copy of the target)")
    p.add_argument("--draft", choices=["ngram"], help="prompt lookup instead of a draft model")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--k", default="3", help="proposals per round, one value or several: 2,3,4")
    p.add_argument("--prompt", default=STORY, help="the user's message (the chat template is applied)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="eager steps (for a quick check, not for figures)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if bool(a.draft_checkpoint) == bool(a.draft):
        raise UsageError("give one of --draft-checkpoint DIR and --draft ngram")
    try:
        ks = sorted({int(k) for k in a.k.split(",")})
    except ValueError:
        raise UsageError(f"--k: numbers separated by commas, not {a.k!r}") from None
    if min(ks) < 1 or a.rounds < 1 or a.max_new_tokens < 2:
        raise UsageError("--k values and --rounds must be >= 1, --max-new-tokens >= 2")

    device, dtype = pick_device(a.device), getattr(torch, a.dtype)
    checkpoint = a.checkpoint or default_checkpoint()
    target = load_model(checkpoint, device=device, dtype=dtype)
    draft = load_model(a.draft_checkpoint, device=device, dtype=dtype) if a.draft_checkpoint else None
    if draft is not None and draft.args.vocab_size != target.args.vocab_size:
        raise UsageError(f"the draft's vocabulary ({draft.args.vocab_size}) differs from the target's "
                         f"({target.args.vocab_size})")
    prompt = load_tokenizer(checkpoint).encode_chat([{"role": "user", "content": a.prompt}])
    cache = len(prompt) + a.max_new_tokens + max(ks)  # the verify step writes k slots past the text
    for m in (target, draft):
        if m is not None:
            m.setup_caches(max_batch_size=1, max_seq_length=cache)
    # one Steps for both: plain decoding runs its decode step, speculative its verify and draft steps
    steps = SpeculativeSteps(target, compile=not a.no_compile, draft=draft)
    params = SamplingParams(max_tokens=a.max_new_tokens, ignore_eos=True)

    def run(method):
        stats = {}
        if method == "plain":
            tokens = generate(target, prompt, params, steps=steps)
        else:
            tokens = speculative_generate(target, prompt, params, k=method, draft=draft, stats=stats, steps=steps)
        out, speed = decode_tok_s(tokens)
        return out, speed, stats

    plain_text = run("plain")[0]  # compiles the decode step; the greedy text to compare with
    for k in ks:
        run(k)  # compiles the verify and draft steps
    methods = ["plain"] + ks
    results = {m: {"tok_s": [], "acceptance": None, "same_tokens_as_plain": None} for m in methods}
    for r in range(a.rounds):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for method in order:
            out, speed, stats = run(method)
            row = results[method]
            row["tok_s"].append(speed)
            if method != "plain":
                row["acceptance"] = stats["accepted"] / max(stats["proposed"], 1)
                # greedy: the same text up to rounding (speculative.py); where it leaves the plain one
                row["same_tokens_as_plain"] = next((i for i, (x, y) in enumerate(zip(out, plain_text)) if x != y),
                                                   len(out))
        print(f"round {r + 1}: " + ", ".join(f"{m if m == 'plain' else f'k={m}'} {results[m]['tok_s'][-1]:.1f}"
                                             for m in methods) + " tok/s", flush=True)
    plain = results["plain"]["tok_s"]
    what = f"draft {a.draft_checkpoint}" if draft is not None else "prompt lookup"
    print(f"{checkpoint}, {a.dtype}, {'eager' if a.no_compile else 'compiled'}, {what}, {a.max_new_tokens} tokens, "
          f"{a.rounds} rounds: plain {statistics.median(plain):.1f} tok/s")
    for k in ks:
        row = results[k]
        row["ratios"] = [s / b for s, b in zip(row["tok_s"], plain)]
        row["median_ratio"] = statistics.median(row["ratios"])
        print(f"  k={k}: {statistics.median(row['tok_s']):.1f} tok/s, {row['median_ratio']:.2f}x plain (rounds "
              f"{', '.join(f'{x:.2f}' for x in row['ratios'])}), acceptance {row['acceptance']:.3f}, "
              f"the first {row['same_tokens_as_plain']} tokens as plain decoding's")
    if a.json:
        write_json(a.json, {"checkpoint": checkpoint, "draft": a.draft_checkpoint or a.draft, "dtype": a.dtype,
                            "compiled": not a.no_compile, "max_new_tokens": a.max_new_tokens,
                            "results": {str(m): v for m, v in results.items()}})
        print(f"written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
