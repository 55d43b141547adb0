"""int8 and int4 weight quantization (round-to-nearest or GPTQ) of nimblelm checkpoints.

    python quantize.py --checkpoint DIR --mode int8 --out DIR-int8
    python quantize.py --checkpoint DIR --mode int4 --groupsize 32 --out DIR-int4
    python quantize.py --checkpoint DIR --mode int4-gptq --groupsize 64 --calibration text.txt --out DIR-gptq

The output is a checkpoint like any other (safetensors + config.json, which records the scheme under
"quantization"); generate.py, eval.py and bench.py load it with no extra flag.

- int8: symmetric, one scale per output channel: w = q * scale, q in [-127, 127]; smoothed first
  (SmoothQuant) on calibration text, so that the CPU's int8-activation kernels round little (qlinear.py).
- int4: asymmetric, one scale and zero point per group of `groupsize` inputs: w = (q - 8) * scale + zero,
  q in [0, 15], stored two to a byte (even input index in the low nibble).
- int4-gptq: the same format, with the rounding chosen by GPTQ (Frantar et al., 2022) on calibration text:
  columns are quantized one at a time and each one's error is spread over the columns not yet quantized,
  weighted by the inverse Hessian of the layer's inputs.

Every linear layer is quantized, the output head included. When the head is tied to the embedding (the
default model), the head gets a quantized copy and the embedding stays in the float dtype: a decode step
reads one row of the embedding but the whole head, so this is where the bytes are.

The layers that run these formats at load time are in qlinear.py.
"""
import json
import os
import shutil
import sys

import torch
import torch.nn as nn

from checkpoint import load_model, load_tokenizer
from convert_checkpoint import checkpoint_directory
from errors import ArgumentParser, UsageError, run_command
from qlinear import pack_int4

MODES = ("int8", "int4", "int4-gptq")
# SmoothQuant's migration strength for int8: the default model's perplexity with int8 activations was
# closest to bfloat16's at 0.7, of 0.5, 0.6, 0.65, 0.7, 0.75, 0.8 and 0.85 (BENCHMARKS.md)
SMOOTHING = 0.7


class QuantizationError(UsageError):
    """A request that cannot be quantized: named, in one line."""


# ---------------------------------------------------------------------------------------------------------
# Quantizing


def quantize_int8(w: torch.Tensor):
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def int4_group_params(w: torch.Tensor, groupsize: int):
    """Per-group (scale, zero) of w [out, in] for values q = round((w - min) / scale) in 0..15."""
    g = w.float().reshape(w.shape[0], -1, groupsize)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    return scale, lo  # [out, in / groupsize] each


def int4_quantize_with(w, scale, lo, groupsize):
    g = w.float().reshape(w.shape[0], -1, groupsize)
    return torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).reshape(w.shape)


def int4_state(q, scale, lo):
    zero = lo + 8 * scale  # so that (q - 8) * scale + zero == q * scale + lo
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return pack_int4(q), scales_and_zeros


def quantize_int4(w: torch.Tensor, groupsize: int):
    scale, lo = int4_group_params(w, groupsize)
    return int4_state(int4_quantize_with(w, scale, lo, groupsize), scale, lo)


def gptq_int4(w: torch.Tensor, hessian: torch.Tensor, groupsize: int, damp: float = 0.01):
    """GPTQ for one layer: w [out, in], hessian = 2 X^T X [in, in] of its calibration inputs."""
    block = max(128, groupsize)  # a multiple of the group size: no group straddles two blocks
    W = w.float().clone()
    H = hessian.float().clone()
    dead = torch.diag(H) == 0  # inputs never seen: any value does
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], device=H.device)
    # Upper Cholesky factor of H^-1: row i holds what quantizing column i does to the later columns.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    scale = torch.zeros(W.shape[0], W.shape[1] // groupsize, device=W.device)
    lo = torch.zeros_like(scale)
    for start in range(0, W.shape[1], block):
        end = min(start + block, W.shape[1])
        W1, Err = W[:, start:end].clone(), torch.zeros(W.shape[0], end - start, device=W.device)
        for i in range(end - start):
            col = start + i
            if col % groupsize == 0:  # the group's grid is set from its weights as updated so far
                s, l = int4_group_params(W1[:, i:i + groupsize], groupsize)
                scale[:, col // groupsize], lo[:, col // groupsize] = s[:, 0], l[:, 0]
            s, l = scale[:, col // groupsize], lo[:, col // groupsize]
            q = torch.round((W1[:, i] - l) / s).clamp(0, 15)
            Q[:, col] = q
            err = (W1[:, i] - (q * s + l)) / Hinv[col, col]
            W1[:, i:] -= err[:, None] * Hinv[col, start + i:end][None, :]
            Err[:, i] = err
        W[:, end:] -= Err @ Hinv[start:end, end:]
    return int4_state(Q, scale, lo)


def calibration_ids(checkpoint: str, path, tokens: int) -> list:
    """Token ids of the calibration text: the file at path, or else the end of Python's own help topics
    (real English prose that every Python carries, and not the part that tests and benchmarks evaluate on)."""
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise QuantizationError(f"{path}: cannot read it as UTF-8 text ({e})")
    else:
        from pydoc_data.topics import topics
        text = "\n\n".join(topics[k] for k in sorted(topics))[-(tokens * 10):]
    ids = load_tokenizer(checkpoint).encode(text)[:tokens]
    if len(ids) < 256:
        raise QuantizationError(f"{path or 'the calibration text'}: too little text for calibration "
                                f"({len(ids)} tokens)")
    return ids


def calibrate(model, ids: torch.Tensor, window: int, observe):
    """Run the calibration tokens through the model in windows, calling observe(name, x [rows, in]) with
    the input of every linear layer. The output head's input is observed, but the head is not run: it is
    the largest product of all, at every position, and its output is not needed."""
    def observe_rows(name, x):  # x [..., in] as the rows [rows, in] in float32
        observe(name, x.reshape(-1, x.shape[-1]).float())

    def hook(name):
        return lambda module, inputs: observe_rows(name, inputs[0])
    hooks = [module.register_forward_pre_hook(hook(name)) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and module is not model.output]
    head, model.output = model.output, None  # the model then returns its last layer's output
    model.setup_caches(1, window)
    try:
        with torch.no_grad():
            for start in range(0, ids.numel() - 1, window):
                chunk = ids[start:start + window][None]
                observe_rows("output", model.norm(model(chunk, torch.arange(chunk.shape[1]))))
    finally:
        model.output = head
        for h in hooks:
            h.remove()


def collect_hessians(model, ids: torch.Tensor, window: int) -> dict:
    """2 X^T X of the inputs of every linear layer, over the calibration tokens."""
    hessians, counts = {}, {}

    def observe(name, x):
        n = counts.get(name, 0)
        h = hessians.get(name, torch.zeros(x.shape[1], x.shape[1]))
        h *= n / (n + x.shape[0])
        hessians[name] = h + (2 / (n + x.shape[0])) * x.t() @ x
        counts[name] = n + x.shape[0]
    calibrate(model, ids, window, observe)
    return hessians


def collect_input_ranges(model, ids: torch.Tensor, window: int) -> dict:
    """The largest |input| of every linear layer per input channel, over the calibration tokens."""
    ranges = {}

    def observe(name, x):
        m = x.abs().amax(dim=0)
        ranges[name] = torch.maximum(ranges[name], m) if name in ranges else m
    calibrate(model, ids, window, observe)
    return ranges


def smooth(model, ranges: dict, alpha: float = SMOOTHING, dtype: torch.dtype = torch.float32):
    """SmoothQuant (Xiao et al., 2022) for int8 activations: a few input channels of a layer carry values
    far larger than the rest, and per-row rounding to 8 bits loses the others. Dividing input channel j by
    s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) and multiplying the weight's column j by it leaves the
    product unchanged and evens out the activations. The division folds into what makes the input: the
    RMSNorm weight before q/k/v, before gate/up and before the output head, and the up projection's rows
    before the down projection (silu(gate) * up / s = silu(gate) * (up / s)).

    The norms' weights are stored in `dtype` (the checkpoint's): each is rounded to it first, and the
    weight's column takes the factor the rounded norm weight implies, so the product stays exact. (Rounded
    after smoothing instead, they decided whether int8 stays within 1% of bfloat16's perplexity: see
    BENCHMARKS.md.)"""
    def fold(source, linear, name):  # source: a norm's weight [in], or the rows [in, ...] that make the input
        s = ranges[name].clamp(min=1e-5) ** alpha / linear.weight.abs().amax(dim=0).clamp(min=1e-5) ** (1 - alpha)
        s = s.clamp(min=1e-2, max=1e2)  # an input never seen on calibration text keeps its scale
        if source.dim() == 1:
            rounded = (source / s).to(dtype).float()
            s = torch.where(rounded != 0, source / rounded, s)
            source.copy_(rounded)
        else:  # rows that are quantized themselves: their rounding is the int8 grid's
            source.div_(s[:, None])
        linear.weight.mul_(s[None, :])

    with torch.no_grad():
        if model.output.weight is model.tok_embeddings.weight:  # the head gets its own copy: the embedding stays
            model.output.weight = nn.Parameter(model.output.weight.clone())
        for i, layer in enumerate(model.layers):
            fold(layer.attention_norm.weight, layer.attention.wqkv, f"layers.{i}.attention.wqkv")
            fold(layer.ffn_norm.weight, layer.feed_forward.w13, f"layers.{i}.feed_forward.w13")
            up = layer.feed_forward.w13.weight.data[layer.feed_forward.intermediate_size:]
            fold(up, layer.feed_forward.w2, f"layers.{i}.feed_forward.w2")
        fold(model.norm.weight, model.output, "output")


def quantize_checkpoint(checkpoint: str, out: str, mode: str, groupsize: int = 32, calibration: str = None,
                        calibration_tokens: int = 16384):
    from safetensors.torch import save_file
    if mode not in MODES:
        raise QuantizationError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    if os.path.exists(out):
        raise QuantizationError(f"{out} already exists; remove it or choose another --out")
    with open(os.path.join(checkpoint, "config.json")) as f:
        config = json.load(f)
    if "quantization" in config:
        raise QuantizationError(f"{checkpoint} is already quantized ({config['quantization']['mode']}); "
                                "quantize the float checkpoint instead")
    if mode == "int4-gptq" and not calibration:
        raise QuantizationError("int4-gptq needs --calibration FILE (plain text)")
    model = load_model(checkpoint, dtype=torch.float32)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if mode != "int8":
        for name, m in linears.items():
            if m.in_features % groupsize:
                raise QuantizationError(f"group size {groupsize} does not divide the input dimension "
                                        f"{m.in_features} of {name}")
    from safetensors import safe_open
    with safe_open(os.path.join(checkpoint, "model.safetensors"), framework="pt") as f:
        float_dtype = f.get_tensor("norm.weight").dtype  # the rest is kept in the checkpoint's dtype
    hessians = {}
    if mode in ("int8", "int4-gptq"):
        ids = torch.tensor(calibration_ids(checkpoint, calibration, calibration_tokens))
        window = min(512, model.args.max_seq_len)
        if mode == "int8":
            smooth(model, collect_input_ranges(model, ids, window), dtype=float_dtype)
        else:
            hessians = collect_hessians(model, ids, window)
    state = {}
    for name, t in model.state_dict().items():
        module_name = name.rsplit(".", 1)[0]
        if module_name in linears and name.endswith(".weight"):
            continue
        state[name] = t.to(float_dtype if t.is_floating_point() else t.dtype).contiguous()
    for i, (name, m) in enumerate(linears.items()):
        w = m.weight.detach()
        if mode == "int8":
            q, scales = quantize_int8(w)
            state[name + ".weight"], state[name + ".scales"] = q, scales
        else:
            packed, sz = (gptq_int4(w, hessians[name], groupsize) if mode == "int4-gptq" and name in hessians
                          else quantize_int4(w, groupsize))
            state[name + ".weight"], state[name + ".scales_and_zeros"] = packed, sz
        print(f"\rquantizing {i + 1}/{len(linears)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    config["quantization"] = ({"mode": "int8", "smoothing": SMOOTHING} if mode == "int8" else
                              {"mode": "int4", "groupsize": groupsize,
                               "method": "gptq" if mode == "int4-gptq" else "rtn"})
    with checkpoint_directory(out) as tmp:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for f in os.listdir(checkpoint):
            if f not in ("model.safetensors", "config.json"):
                shutil.copy(os.path.join(checkpoint, f), tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)


def main(argv=None):
    p = ArgumentParser(description="Quantize a nimblelm checkpoint's weights to int8 or int4.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--mode", required=True, help="int8, int4 or int4-gptq")
    p.add_argument("--groupsize", type=int, default=32, help="int4 group size: 32, 64, 128 or 256")
    p.add_argument("--calibration", help="plain text for int4-gptq and int8's smoothing (default for int8: "
                                         "Python's help topics)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.groupsize not in (32, 64, 128, 256):
        raise QuantizationError(f"--groupsize must be 32, 64, 128 or 256, not {a.groupsize}")
    if not os.path.isdir(a.checkpoint):
        raise QuantizationError(f"{a.checkpoint}: no such checkpoint directory")
    try:
        quantize_checkpoint(a.checkpoint, a.out, a.mode, a.groupsize, a.calibration)
    except OSError as e:
        raise QuantizationError(str(e))
    print(f"wrote {a.out} ({a.mode})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
