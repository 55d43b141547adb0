"""How the next token is chosen: the per-request options, validated, and sampling on the device.

    params = SamplingParams(max_tokens=100, temperature=0.8, top_p=0.95, seed=1, stop=("\\n\\n",))
    token = sample(logits, params.temperature, params.top_k, params.top_p)   # logits [B, vocab] -> [B]

The command line builds one SamplingParams from its flags; the decode loop, speculative decoding and
the serving engine take it as it is.
"""
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from errors import UsageError


def check_number(options, name: str, integer: bool, low, low_ok: bool = True, high=None, high_ok: bool = True,
                 optional: bool = False):
    """A UsageError, named by the field, unless options.name is an integer (or a real number, NaN never)
    within the bounds; None passes when optional."""
    value = getattr(options, name)
    if value is None and optional:
        return
    kind = numbers.Integral if integer else numbers.Real
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UsageError(f"{name} must be {'an integer' if integer else 'a number'}, not {value!r}", name)
    if (value != value or value < low or (value == low and not low_ok)
            or (high is not None and (value > high or (value == high and not high_ok)))):
        if high is None:
            bound = f"{'>=' if low_ok else '>'} {low}"
        else:
            bound = f"in {'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"
        raise UsageError(f"{name} must be {bound}, not {value}", name)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 200               # new tokens at most
    temperature: float = 0.0            # 0: greedy (argmax)
    top_k: Optional[int] = None         # sample among the k most likely tokens only
    top_p: Optional[float] = None       # ... among the fewest most likely tokens whose probability reaches top_p
    seed: Optional[int] = None          # seeds torch's generator when decoding starts: same seed, same tokens
    stop: tuple = ()                    # the text ends where one of these strings appears (not included)
    ignore_eos: bool = False            # go on past end-of-text tokens (for benchmarks)
    min_tokens: int = 0                 # no end token, no stop string before this many new tokens (engine)

    def __post_init__(self):
        check_number(self, "max_tokens", True, 0)
        check_number(self, "min_tokens", True, 0)
        check_number(self, "temperature", False, 0)
        check_number(self, "top_k", True, 1, optional=True)
        check_number(self, "top_p", False, 0, low_ok=False, high=1, optional=True)
        # what torch.manual_seed takes
        check_number(self, "seed", True, -(1 << 63), high=(1 << 64) - 1, optional=True)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise UsageError(f"stop must be a string or a list of strings, not {self.stop!r}", "stop")
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        if not isinstance(self.ignore_eos, bool):
            raise UsageError(f"ignore_eos must be true or false, not {self.ignore_eos!r}", "ignore_eos")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for x [B, vocab] (the first index of each row's largest value). Compiled for the
    CPU, qkernels.cpp's one-pass kernel (where a NaN counts as the largest, as in torch.argmax); for other
    devices, two passes that Inductor makes vectorised loops of: the largest value, then the least index
    that holds it (a row whose largest value is NaN gives the last index). Inductor's own argmax carries an
    index through a loop of one value at a time, several times slower over the default model's
    vocabulary; eager, PyTorch's kernel is as fast as the two passes or faster (BENCHMARKS.md)."""
    if not torch.compiler.is_compiling():
        return x.argmax(dim=-1)
    # qkernels.cpp's op where it is built, which every CPU step that samples has done before it is traced
    # (decode.inductor_options' attention pass, ExportedStep.suits). (Asked of torch.ops, not of a function
    # marked constant for Dynamo: marking it would import Dynamo with this file, over a second of every
    # command's start.)
    if x.device.type == "cpu" and x.dim() == 2 and hasattr(torch.ops.nimblelm, "argmax"):
        return torch.ops.nimblelm.argmax(x.float().contiguous())
    x = x.float()
    index = torch.arange(x.shape[-1], device=x.device)
    return torch.where(x == x.amax(dim=-1, keepdim=True), index, x.shape[-1] - 1).amin(dim=-1)


def sample_from(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row of probs [B, vocab]. Exponential race: argmax(p / E), E ~ Exp(1), is a draw from
    p and needs no host synchronisation."""
    return argmax(probs / torch.empty_like(probs).exponential_(1))


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None) -> torch.Tensor:
    """logits [B, vocab] -> tokens [B], on the device and without a host synchronisation."""
    if temperature <= 0:
        return argmax(logits)
    return sample_from(probabilities(logits, temperature, top_k, top_p))


def sample_rows(logits: torch.Tensor, params: list, generators: list) -> list:
    """logits [B, vocab] -> one token per row, row i sampled with params[i]; a row with a generator draws
    its randomness from it alone, so its tokens do not depend on the other rows."""
    tokens = logits.argmax(dim=-1)
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.temperature > 0:
            probs = probabilities(logits[i:i + 1], p.temperature, p.top_k, p.top_p)
            noise = torch.empty_like(probs).exponential_(1, generator=g)
            tokens[i] = (probs / noise).argmax(dim=-1)[0]
    return tokens.tolist()
