"""Beam search over the static KV cache: the best continuations of each prompt, scored and ended as
transformers' beam search scores and ends them, with the pruning strategies of Freitag and Al-Onaizan
(2017, "Beam Search Strategies for Neural Machine Translation").

    model.setup_caches(max_batch_size=len(prompts) * 4, max_seq_length=256)
    steps = BeamSteps(model, compile=True)                # once per model
    results = beam_search(model, prompts, BeamParams(num_beams=4, max_tokens=50), eos_ids=tok.eos_ids, steps=steps)
    results[0][0].token_ids, results[0][0].score          # the best hypothesis of the first prompt

How it runs: the KV cache holds num_beams rows per prompt. The prompts are prefilled once, one row each,
and each row is copied to its beams' rows. Every step then computes one token for every beam row at once
(the same compiled graph as greedy decoding of that many rows), chooses the surviving beams, and reorders
the cache rows in place: only the rows whose beam changed parent, and only their filled positions. The
cache never moves, so the compiled step stays one graph.

Scores follow transformers (`sequences_scores`): a hypothesis's score is the sum of its tokens'
log-probabilities divided by (generated length ** length_penalty), the generated length counting its end
token. Each step keeps the (1 + max(1, number of end tokens)) * num_beams best candidates; the best
num_beams that do not end run on, and those among the first num_beams that end enter the finished list.
"""
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from decode import Steps, attended_length
from errors import UsageError
from model import Transformer
from sampling import check_number

NEG = -1.0e9  # the score penalty of a candidate that may not be chosen, as transformers adds it


@dataclass(frozen=True)
class BeamParams:
    num_beams: int = 4                  # hypotheses kept per prompt
    max_tokens: int = 200               # new tokens at most per hypothesis
    length_penalty: float = 1.0         # score = sum of log-probs / length ** length_penalty (> 0 favours long)
    # True: stop once num_beams hypotheses have ended. False: stop once the best running hypothesis,
    # scored at its current length, cannot beat the worst finished one. "never": at its best possible length.
    early_stopping: Union[bool, str] = False
    num_return_sequences: int = 1       # hypotheses returned per prompt, best first
    # Pruning (Freitag and Al-Onaizan). A candidate that would run on is dropped when its probability is
    # below rel_threshold times the best candidate's; when its log-probability is more than abs_threshold
    # below the best's; when its last token's probability is below local_threshold times the best last
    # token's; or when max_candidates better candidates share its parent. The defaults drop nothing.
    rel_threshold: float = 0.0
    abs_threshold: float = math.inf
    local_threshold: float = 0.0
    max_candidates: Optional[int] = None

    def __post_init__(self):
        check_number(self, "num_beams", True, 1)
        check_number(self, "max_tokens", True, 1)
        check_number(self, "num_return_sequences", True, 1)
        if self.num_return_sequences > self.num_beams:
            raise UsageError(f"num_return_sequences ({self.num_return_sequences}) must not exceed num_beams "
                             f"({self.num_beams})", "num_return_sequences")
        check_number(self, "length_penalty", False, -math.inf, low_ok=False, high=math.inf, high_ok=False)
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise UsageError(f"early_stopping must be true, false or never, not {self.early_stopping!r}",
                             "early_stopping")
        check_number(self, "rel_threshold", False, 0, high=1, high_ok=False)
        check_number(self, "abs_threshold", False, 0, low_ok=False)
        check_number(self, "local_threshold", False, 0, high=1, high_ok=False)
        check_number(self, "max_candidates", True, 1, optional=True)

    @property
    def prunes(self) -> bool:
        return (self.rel_threshold > 0 or self.abs_threshold < math.inf or self.local_threshold > 0
                or self.max_candidates is not None)


@dataclass
class Hypothesis:
    token_ids: list   # the generated ids, the end token included when one ended it
    score: float      # transformers' sequences_scores


# ---------------------------------------------------------------------------------------------------------
# The steps: log-probabilities of the next token, eager or compiled


def prefill_log_probs(model, tokens, input_pos, left_pad, kv_len):
    """tokens [B, S] at cache positions input_pos [S] -> log-probabilities of each row's next token [B, V]."""
    return torch.log_softmax(model(tokens, input_pos, left_pad, kv_len, last_only=True)[:, -1].float(), dim=-1)


def decode_log_probs(model, token, input_pos, left_pad, kv_len):
    """One token per row [B] at cache position input_pos [1] -> log-probabilities of the next [B, V]."""
    return torch.log_softmax(model(token[:, None], input_pos, left_pad, kv_len)[:, -1].float(), dim=-1)


class BeamSteps(Steps):
    """A model's beam-search steps, eager or compiled; make one per model and pass it to every call."""
    prefill_fn, decode_fn = staticmethod(prefill_log_probs), staticmethod(decode_log_probs)


# ---------------------------------------------------------------------------------------------------------
# Pruning


def pruned(params: BeamParams, scores, local, parent):
    """Which candidates the pruning options drop: scores and local (the last token's log-probability) of
    each prompt's candidates [B, W], best first, and their parent beams [B, W] -> bool [B, W]."""
    drop = torch.zeros_like(scores, dtype=torch.bool)
    best = scores[:, :1]
    if params.rel_threshold > 0:
        drop |= scores < best + math.log(params.rel_threshold)
    if params.abs_threshold < math.inf:
        drop |= scores < best - params.abs_threshold
    if params.local_threshold > 0:
        drop |= local < local.max(dim=1, keepdim=True).values + math.log(params.local_threshold)
    if params.max_candidates is not None:
        # rank of each candidate among the better ones with the same parent
        same = parent[:, :, None] == parent[:, None, :]                    # [B, W, W]
        earlier = torch.ones_like(same[0]).tril(-1)                         # [W, W]: j < i
        drop |= (same & earlier).sum(-1) >= params.max_candidates
    return drop


# ---------------------------------------------------------------------------------------------------------
# The search state, between model steps


class BeamState:
    """The beams of B prompts between model steps: running hypotheses with their log-probabilities, and
    the finished ones with their scores. advance() takes each beam's next-token log-probabilities and
    chooses the next beams; the caller then gives each new beam its parent's KV cache (beam_search
    reorders static cache rows; the engine forks block tables) and computes the beams' next step."""

    def __init__(self, params: BeamParams, batch: int, eos_ids, device):
        B, K, self.params = batch, params.num_beams, params
        self.B, self.K, self.max_new = B, K, params.max_tokens
        self.eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
        self.W = (1 + max(1, len(eos_ids))) * K  # candidates kept per step: K run on even if K of them end
        # Only beam 0 is live at first, so the first step does not choose the same token K times.
        self.running = torch.zeros(B, K, self.max_new, dtype=torch.long, device=device)   # (B, K, new tokens)
        self.running_scores = torch.full((B, K), NEG, device=device)
        self.running_scores[:, 0] = 0
        self.finished = torch.zeros_like(self.running)
        self.finished_len = torch.zeros(B, K, dtype=torch.long, device=device)
        self.finished_scores = torch.full((B, K), NEG, device=device)
        self.is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
        self.improvable = torch.ones(B, 1, dtype=torch.bool, device=device)  # the best may still change
        self.top_k_mask = torch.arange(self.W, device=device) < K            # only these candidates may finish
        self.row_base = (torch.arange(B, device=device) * K)[:, None]        # (B, 1): a prompt's first row
        self.n = 0  # tokens generated so far by every running hypothesis

    def advance(self, log_probs: torch.Tensor):
        """log_probs [B*K, V] of each beam's next token -> (done, parent rows, tokens): whether the search
        is over, and for each new beam (row i = prompt * K + beam) the row of its parent and its new token,
        as lists. One host transfer."""
        p, B, K, n, max_new = self.params, self.B, self.K, self.n, self.max_new
        lp, early = p.length_penalty, p.early_stopping
        V = log_probs.shape[-1]
        # a. The W best candidates of each prompt over all its beams.
        flat = log_probs.reshape(B, K * V)
        total = (log_probs.reshape(B, K, V) + self.running_scores[:, :, None]).view(B, K * V)
        scores, index = total.topk(min(self.W, K * V))
        parent, token = index // V, index % V                                 # (B, W)
        candidates = self.running.gather(1, parent[:, :, None].expand(-1, -1, max_new)).clone()
        candidates[:, :, n] = token
        ends = torch.isin(token, self.eos) | (n + 1 >= max_new)

        # b. The K best that do not end run on. With pruning there may be fewer than K: the rest run on
        # dead (score -inf), and so do candidates that ended, rather than going on as transformers lets them.
        go_on = scores + ends.float() * NEG
        if p.prunes:
            go_on = go_on.masked_fill(pruned(p, scores, flat.gather(1, index), parent) | ends, -math.inf)
        keep = go_on.topk(K).indices
        self.running = candidates.gather(1, keep[:, :, None].expand(-1, -1, max_new))
        self.running_scores = go_on.gather(1, keep)
        running_parent = parent.gather(1, keep)

        # c. Candidates among the first K that end join the finished list, unless it is full (with early
        # stopping) or can no longer improve.
        just_ended = ends & self.top_k_mask
        ended_scores = scores / ((n + 1) ** lp)
        ended_scores = ended_scores + (self.is_finished.all(-1, keepdim=True) & (early is True)).float() * NEG
        ended_scores = ended_scores + (~self.improvable).float() * NEG
        ended_scores = ended_scores + (~just_ended).float() * NEG
        best = torch.cat((self.finished_scores, ended_scores), 1).topk(K).indices
        self.finished = torch.cat((self.finished, candidates), 1).gather(1, best[:, :, None].expand(-1, -1, max_new))
        self.finished_len = torch.cat((self.finished_len, torch.full_like(token, n + 1)), 1).gather(1, best)
        self.finished_scores = torch.cat((self.finished_scores, ended_scores), 1).gather(1, best)
        self.is_finished = torch.cat((self.is_finished, just_ended), 1).gather(1, best)
        self.n = n = n + 1

        # d. Can the best running hypothesis still beat the worst finished one?
        length = max_new if early == "never" and lp > 0 else n
        best_possible = self.running_scores[:, :1] / (length ** lp)
        worst = torch.where(self.is_finished, self.finished_scores.min(1, keepdim=True).values, NEG)
        self.improvable = self.improvable & (best_possible > worst).any(-1, keepdim=True)
        done = ~self.improvable.any() | (self.is_finished.all() & (early is True)) | ends.all()
        src = (self.row_base + running_parent).view(-1)
        host = torch.cat((done.view(1).long(), src, self.last_tokens)).tolist()
        return bool(host[0]), host[1:1 + B * K], host[1 + B * K:]

    @property
    def last_tokens(self) -> torch.Tensor:
        """The running beams' newest tokens [B*K]."""
        return self.running[:, :, self.n - 1].reshape(-1).contiguous()  # one stride: no recompilation

    def results(self) -> list:
        """For each prompt, its num_return_sequences best finished hypotheses, best first (fewer when
        pruning ended the search with fewer finished)."""
        out = []
        for b in range(self.B):
            ids, lengths = self.finished[b].tolist(), self.finished_len[b].tolist()
            flags, values = self.is_finished[b].tolist(), self.finished_scores[b].tolist()
            out.append([Hypothesis(ids[i][:lengths[i]], values[i])
                        for i in range(self.params.num_return_sequences) if flags[i]])
        return out


# ---------------------------------------------------------------------------------------------------------
# Beam search over the static KV cache


def reorder_cache(model: Transformer, src: list, filled: int) -> int:
    """Row i of every layer's KV cache takes the first `filled` positions of row src[i]; rows with
    src[i] == i are not touched. Returns the bytes moved (read plus written)."""
    rows = [i for i, s in enumerate(src) if s != i]
    if not rows:
        return 0
    device = model.dtype_device()[1]
    dst_t = torch.tensor(rows, device=device)
    src_t = torch.tensor([src[i] for i in rows], device=device)
    moved = 0
    for layer in model.layers:
        cache = layer.attention.kv_cache
        for buf in (cache.k_cache, cache.v_cache):
            part = buf[:, :, :filled]  # (rows, H_kv, filled, D), a view: the cache stays where it is
            part.index_copy_(0, dst_t, part.index_select(0, src_t))  # gathered first, so sources are intact
            moved += 2 * len(rows) * part[0].numel() * part.element_size()
    return moved


def beam_search(model: Transformer, prompt_tokens, params: BeamParams = BeamParams(), *, eos_ids=(),
                steps: Optional[BeamSteps] = None, stats: Optional[dict] = None):
    """The params.num_return_sequences best hypotheses of each prompt, best first.

    prompt_tokens: a list of ids (returns a list of Hypothesis) or a list of such lists of any lengths
    (returns one list per prompt). The caches must be set up with a row per beam of every prompt
    (model.setup_caches(len(prompts) * num_beams, ...)) and room for the longest prompt plus max_tokens.
    With pruning a prompt may end with fewer finished hypotheses than asked for; it returns those.
    stats, when given, receives steps, reorder_bytes and reordered_rows.
    """
    single = not prompt_tokens or isinstance(prompt_tokens[0], int)
    rows = [list(prompt_tokens)] if single else [list(p) for p in prompt_tokens]
    if not rows or any(len(r) == 0 for r in rows):
        raise UsageError("empty prompt")
    K, max_new = params.num_beams, params.max_tokens
    B, T = len(rows), max(len(r) for r in rows)
    if B * K > model.max_batch_size or T + max_new - 1 > model.max_seq_length:
        raise UsageError(f"the KV cache (batch {model.max_batch_size}, {model.max_seq_length} positions) is too "
                         f"small for {B} prompt(s) x {K} beams of up to {T} tokens plus {max_new} new tokens")
    steps = steps or BeamSteps(model)
    device = model.dtype_device()[1]
    left_pad = None
    if any(len(r) != T for r in rows):
        left_pad = torch.tensor([T - len(r) for r in rows], device=device)
        rows = [[0] * (T - len(r)) + r for r in rows]
    beam_pad = None if left_pad is None else left_pad.repeat_interleave(K)  # [B*K]
    state = BeamState(params, B, eos_ids, device)
    reorder_bytes = reordered_rows = 0

    with torch.inference_mode():
        log_probs = steps.prefill(model, torch.tensor(rows, device=device), torch.arange(T, device=device),
                                  left_pad, attended_length(model, T))       # (B, V)
        reorder_cache(model, [row // K for row in range(B * K)], T)  # each prompt's K/V to its beams' rows
        log_probs = log_probs.repeat_interleave(K, dim=0)
        while True:
            done, src, _ = state.advance(log_probs)
            if done:
                break
            # Each beam's row takes its parent's K/V (at the first step all rows are equal), then every
            # beam computes its new token.
            n = state.n
            if n > 1:
                moved = reorder_cache(model, src, T + n - 1)
                reorder_bytes += moved
                reordered_rows += sum(s != i for i, s in enumerate(src))
            log_probs = steps.decode(model, state.last_tokens, torch.tensor([T + n - 1], device=device), beam_pad,
                                     attended_length(model, T + n))

    if stats is not None:
        stats.update(steps=state.n, reorder_bytes=reorder_bytes, reordered_rows=reordered_rows)
    results = state.results()
    return results[0] if single else results
