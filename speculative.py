"""Speculative decoding: a cheap draft proposes k tokens, the target checks them all in one forward pass
and keeps the longest accepted prefix plus one token of its own.

    python generate.py --checkpoint DIR --draft-checkpoint DIR-int4 --speculate-k 3 --prompt "..."
    python generate.py --checkpoint DIR --draft ngram --speculate-k 8 --chat --prompt "Repeat: ..."

Drafts: another checkpoint with the same tokenizer (a quantized copy of the target works well), or
prompt lookup ("ngram"): the tokens that followed the latest earlier occurrence of the last few tokens.

The output is exactly the target's. Greedy: a proposal is kept while it equals the target's argmax.
(Up to rounding: the verify step computes k + 1 positions in one pass, whose floating-point rounding is
not one position's. In bfloat16 two logits within a rounding step of each other can come out in either
order, as they can between eager and compiled steps.)
Sampling (Leviathan et al. 2023; Chen et al. 2023): proposal d, drawn from the draft's q, is kept with
probability min(1, p(d) / q(d)); at the first rejection the token is drawn from max(p - q, 0),
renormalised; if all k are kept, one more is drawn from p. top-k / top-p truncate p and q alike.
Prompt lookup proposes deterministically: q is one-hot.

Both KV caches stay consistent: entries written for rejected proposals sit at positions past the
accepted text, which the causal mask hides until they are overwritten.
"""
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from decode import Steps, attended_length, frozen_settings
from errors import UsageError
from sampling import SamplingParams, probabilities, sample_from


def logits_of(model, tokens, input_pos, kv_len, greedy: bool = False, last_only: bool = False):
    """tokens [1, n] at cache positions input_pos [n] -> float logits [n, vocab], attending to the first
    kv_len cache slots. greedy: each row's argmax token [n] instead, which a compiled step computes in its
    last kernel rather than in a pass over the logits after it. last_only: the last position's alone."""
    logits = model(tokens, input_pos, None, kv_len, last_only=last_only)[0]
    return logits.argmax(-1) if greedy else logits.float()


def logits_at(step, model, tokens: list, pos: int, greedy: bool = False, last_only: bool = False):
    """step (logits_of or a compiled copy) for the tokens at cache positions pos, pos + 1, ..."""
    device = model.norm.weight.device
    end = pos + len(tokens)
    return step(model, torch.tensor([tokens], device=device), torch.arange(pos, end, device=device),
                attended_length(model, end), greedy, last_only)


class SpeculativeSteps(Steps):
    """The target's and the draft's steps: besides the plain decode step (for prompt-lookup rounds with
    no match), the target's verify step (k + 1 tokens) and the draft model's steps (one token; two when
    it catches up). Each compiles as static graphs, none recompiling per step: they share the frame of
    logits_of, so they are compiled with dynamic=False, else the first change of token count would make
    that count symbolic. Greedy rounds get a graph that returns tokens, not logits (logits_of's greedy).

    On the CPU the verify step of a float target freezes its weights (frozen_settings: its products have
    several rows, which oneDNN multiplies by weights packed once instead of reordering them on every
    call), holding a packed copy of them; one whose layers are qlinear.FloatLinear (float32, or a CPU
    without bfloat16 instructions) runs qkernels.cpp's products over the weights as stored. A quantized
    draft model given as `draft` runs qkernels.cpp's products, or where they cannot be built, freezes its
    weights for Inductor's own kernels. Steps that do not freeze are decode.ExportedSteps there (Steps.compiled_for)."""

    def __init__(self, model, compile: bool = False, draft=None):
        super().__init__(model, compile=compile)
        self.verify = self.draft = logits_of
        if compile:
            self.verify = self.compiled_for(model, logits_of, frozen_settings(model, rows=2), dynamic=False)
            draft_frozen = frozen_settings(draft, rows=1) if draft is not None else None
            self.draft = self.compiled_for(draft, logits_of, draft_frozen, dynamic=False)


def ngram_proposal(history: list, k: int, max_n: int = 3) -> list:
    """Up to k tokens that followed the latest earlier occurrence of the history's last n tokens,
    trying n = max_n down to 1; [] when nothing matches."""
    for n in range(min(max_n, len(history) - 1), 0, -1):
        tail = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):
            if history[start:start + n] == tail:
                return history[start + n:start + n + k]
    return []


def accept_sampled(p: torch.Tensor, q: Optional[torch.Tensor], proposal: list) -> tuple:
    """The rejection-sampling rule. p [n + 1, vocab]: the target's distributions after the last token
    and after each of the n proposals; q [n, vocab]: the draft's (None: proposals were certain, q one-hot).
    Returns (how many proposals are kept, the token that follows them), distributed exactly as p."""
    n = len(proposal)
    chosen = torch.tensor(proposal, device=p.device)
    if q is None:
        q = F.one_hot(chosen, p.shape[-1]).float()
    rows = torch.arange(n, device=p.device)
    p_d, q_d = p[rows, chosen], q[rows, chosen]
    keep = (torch.rand(n, device=p.device) * q_d < p_d).tolist()  # u < p(d) / q(d), without dividing
    accepted = keep.index(False) if False in keep else n
    if accepted == n:
        return n, int(sample_from(p[n][None]))
    residual = (p[accepted] - q[accepted]).clamp(min=0)  # max(p - q, 0), renormalised
    return accepted, int(sample_from((residual / residual.sum())[None]))


def speculative_generate(target, prompt: list, params: SamplingParams = SamplingParams(), *, k: int,
                         draft=None, eos_ids=(), stats: Optional[dict] = None,
                         steps: Optional[SpeculativeSteps] = None) -> Iterator[int]:
    """Yield the target's tokens for prompt (batch 1), k proposals per round from `draft` (a model) or,
    with draft=None, from prompt lookup. stats, if given, receives proposed / accepted / target_steps.
    steps: the target's SpeculativeSteps (eager ones when None)."""
    if not prompt:
        raise UsageError("empty prompt")
    if k < 1:
        raise UsageError(f"k (proposals per round) must be >= 1, not {k}", "speculate_k")
    steps = steps or SpeculativeSteps(target)
    max_new_tokens = params.max_tokens
    if max_new_tokens <= 0:
        return
    temperature, top_k, top_p = params.temperature, params.top_k, params.top_p
    eos_ids = () if params.ignore_eos else eos_ids
    device = target.norm.weight.device
    T = len(prompt)
    for m in (target, draft):
        if m is not None and T + max_new_tokens + k > m.max_seq_length:
            raise UsageError(f"the KV cache ({m.max_seq_length} positions) is too small for {T} prompt tokens, "
                             f"{max_new_tokens} new tokens and {k} proposals")
    stats = stats if stats is not None else {}
    stats.update(proposed=0, accepted=0, target_steps=1)
    greedy = params.greedy
    if params.seed is not None:
        torch.manual_seed(params.seed)

    def dist(logits):  # [n, vocab] -> the sampling distribution of each row (greedy: None)
        return None if greedy else probabilities(logits, temperature, top_k, top_p)

    with torch.inference_mode():
        # The prompt: the target's logits at its last position only (the output head over every position
        # would be the prompt's largest product); the draft's pass only fills its cache.
        tokens, positions = torch.tensor([prompt], device=device), torch.arange(T, device=device)
        x = int(steps.prefill(target, tokens, positions, None, attended_length(target, T), temperature, top_k, top_p))
        if draft is not None:
            draft(tokens, positions, None, attended_length(draft, T), last_only=True)
        history, pos, emitted = list(prompt), T, 0  # x is the last token, not yet in either cache
        unread = []  # accepted tokens just before x that the draft's cache lacks
        while True:
            history.append(x)
            yield x
            emitted += 1
            if x in eos_ids or emitted == max_new_tokens:
                return
            # 1. propose
            q = None
            if draft is None:
                proposal = ngram_proposal(history, min(k, max_new_tokens - emitted))
                if not proposal:  # nothing to look up: an ordinary decode step
                    x = int(steps.decode(target, torch.tensor([x], device=device),
                                                 torch.tensor([pos], device=device), None,
                                                 attended_length(target, pos + 1), temperature, top_k, top_p))
                    pos += 1
                    stats["target_steps"] += 1
                    continue
            else:
                proposal, q, tok = [], [], x
                for i in range(k):
                    fed = unread + [tok] if i == 0 else [tok]
                    d_out = logits_at(steps.draft, draft, fed, pos + i + 1 - len(fed), greedy, last_only=True)
                    if greedy:
                        tok = int(d_out[0])
                    else:
                        q.append(dist(d_out)[0])
                        tok = int(sample_from(q[-1][None]))
                    proposal.append(tok)
            # 2. verify: always k + 1 tokens, so the compiled step has one shape (unused tail ignored)
            n = len(proposal)
            padded = [x] + proposal + [proposal[-1]] * (k - n)
            verified = logits_at(steps.verify, target, padded, pos, greedy)  # greedy: the target's tokens
            stats["target_steps"] += 1
            stats["proposed"] += n
            # 3. accept
            if greedy:
                best = verified.tolist()
                accepted = 0
                while accepted < n and proposal[accepted] == best[accepted]:
                    accepted += 1
                nxt = best[accepted]
            else:
                accepted, nxt = accept_sampled(dist(verified)[:n + 1], None if q is None else torch.stack(q), proposal)
            stats["accepted"] += accepted
            # When all k are kept, the draft has not read its own last proposal yet: it reads it together
            # with the next round's first token (one draft step of two tokens instead of two steps).
            unread = [proposal[-1]] if draft is not None and accepted == k else []
            for d in proposal[:accepted]:
                history.append(d)
                yield d
                emitted += 1
                if d in eos_ids or emitted == max_new_tokens:
                    return
            x, pos = nxt, pos + accepted + 1
