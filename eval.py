"""Perplexity of a checkpoint on a text file, with sliding windows for texts longer than the context.

    python eval.py --checkpoint DIR --text FILE [--max-seq-len 512] [--stride 256] [--json]

Windows of --max-seq-len tokens advance by --stride; each token is scored once, in the first window
where it has at least max_seq_len - stride tokens of context (all of them in the first window).
The last line printed is `perplexity: X`, or, with --json, one JSON object.
"""
import json
import math

import torch
import torch.nn.functional as F

import tp
from checkpoint import load_model, load_tokenizer, pick_device, pick_dtype
from errors import ArgumentParser, UsageError, run_command


def perplexity(model, ids: list, max_seq_len: int, stride: int) -> tuple:
    """(perplexity, number of tokens scored) of the token ids under the model."""
    if len(ids) < 2:
        raise UsageError("the text has fewer than 2 tokens")
    device = model.norm.weight.device
    tokens = torch.tensor(ids, device=device)
    model.setup_caches(1, max_seq_len)
    nll, scored, begin = 0.0, 0, 0
    with torch.inference_mode():
        while True:
            end = min(begin + max_seq_len, len(ids))
            window = tokens[begin:end]
            logits = model(window[None], torch.arange(end - begin, device=device))[0].float()
            # predict window[1:]; tokens already scored by the previous window are skipped
            first = 0 if begin == 0 else max_seq_len - stride - 1
            targets = window[1:][first:]
            nll += F.cross_entropy(logits[:-1][first:], targets, reduction="sum").item()
            scored += targets.numel()
            if end == len(ids):
                break
            begin += stride
    return math.exp(nll / scored), scored


def main(argv=None):
    p = ArgumentParser(description="Perplexity of a checkpoint on a text file.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--max-seq-len", type=int, default=512, help="window length in tokens")
    p.add_argument("--stride", type=int, default=None, help="window step (default: half the window)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    device = pick_device(a.device)
    dtype = pick_dtype(a.dtype, device)
    stride = a.stride or max(1, a.max_seq_len // 2)
    if not 0 < stride <= a.max_seq_len - 1:
        raise UsageError(f"--stride must be in [1, {a.max_seq_len - 1}], not {stride}")
    try:
        with open(a.text, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{a.text}: cannot read it as UTF-8 text ({e})")
    model = load_model(a.checkpoint, device=device, dtype=dtype)
    tok = load_tokenizer(a.checkpoint)
    if a.max_seq_len > model.args.max_seq_len:
        raise UsageError(f"--max-seq-len {a.max_seq_len} exceeds the model's context of {model.args.max_seq_len}")
    ids = ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + tok.encode(text)
    ppl, n = perplexity(model, ids, a.max_seq_len, stride)
    if a.json:
        print(json.dumps({"perplexity": ppl, "tokens": n, "checkpoint": a.checkpoint, "text": a.text}))
    else:
        print(f"tokens: {n}\nperplexity: {ppl:.4f}")
    return 0


if __name__ == "__main__":
    tp.exit_process(run_command(main))
