"""Serving many requests on one model: continuous batching (Orca) over a paged KV cache (PagedAttention),
with prefix caching. A Python API shaped like vLLM's:

    engine = Engine.from_checkpoint(DIR, device="cpu", dtype=torch.bfloat16, max_num_seqs=32,
                                    kv_cache_tokens=16384, block_size=16, compile=True)
    rid = engine.add_request(prompt_token_ids, SamplingParams(max_tokens=128))
    for out in engine.step():              # one scheduler iteration: every running request advances
        out.request_id, out.new_token_ids, out.text, out.finished, out.finish_reason
    engine.abort(rid)
    engine.stats()                         # running, waiting, KV blocks, preemptions, prefix-cache hits
    engine.generate(prompts, params)       # offline: all at once, results in order
    engine.add_request(prompt_token_ids, BeamParams(num_beams=4, max_tokens=64))   # beam search

Each step runs the scheduler's plan (scheduler.py, block_manager.py): the decoding requests as one batch,
each row at its own position, padded to a few batch sizes so that the compiled step keeps a small fixed
set of graphs; prompt chunks one forward each. Each request samples with its own options (and its own
generator when it has a seed) and stops at its own end tokens and stop strings.

A beam-search request (BeamParams instead of SamplingParams) runs its beams as sequences of the batch
that share blocks: after each step every new beam forks its parent's block table (reference counts, no
copy), and only a partly filled block that two beams would write is copied. It reports once, at the end,
with its best hypotheses; the search itself is beam.py's, so it chooses what beam_search chooses.

Under torchrun the model is tensor-parallel (checkpoint.load_model), or split into pipeline stages (pp.py's
layout, passed as layout=): each forward of a step then goes through the stages in turn, hidden states sent
from stage to stage, and the last stage's sampled tokens are broadcast to every rank. One batch is in the
pipeline at a time, so each stage waits while the others work (no micro-batches across steps yet), and beam
search does not run pipelined. Every rank must step the same batch. Rank 0 is the engine's front: its
add_request and abort calls are broadcast at the start of the next step, and every rank carries them out
there, so all schedulers make the same plans. On the other ranks add_request and abort only check their
arguments and hand out the same ids.
"""
import itertools
import json
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

import pp
import tp
from beam import BeamParams, BeamState
from block_manager import BlockManager
from checkpoint import load_model, load_tokenizer
from decode import KV_BLOCK, Steps, TextStream
from errors import UsageError
from model import Transformer
from sampling import SamplingParams, sample_rows
from scheduler import Scheduler
from sequence import Sequence, Status

__all__ = ["Engine", "SamplingParams", "BeamParams", "RequestOutput", "Completion"]


@dataclass
class RequestOutput:
    """What one step did for one request."""
    request_id: str
    new_token_ids: list
    text: str                        # the new printable text (empty without a tokenizer)
    finished: bool
    finish_reason: Optional[str]     # "stop" (end token or stop string), "length", "abort"; None while running
    num_prompt_tokens: int
    num_cached_tokens: int           # prompt tokens taken from the prefix cache rather than computed
    hypotheses: Optional[list] = None  # beam search: the best beam.Hypothesis objects, best first


@dataclass
class Completion:
    """A whole request, as Engine.generate returns it."""
    request_id: str
    token_ids: list
    text: str
    finish_reason: str
    num_prompt_tokens: int
    num_cached_tokens: int
    hypotheses: Optional[list] = None


@dataclass
class BeamGroup:
    """A beam-search request inside the engine."""
    state: BeamState
    beams: list                                     # its running sequences, in beam order
    log_probs: dict = field(default_factory=dict)   # sequence -> next-token log-probs, until all beams have them


def paged_logits(model, tokens, positions, write_slots, read_slots):
    """Logits of each row's last token [B, vocab]; hidden states [B, S, dim] on a pipeline stage before the last."""
    out = model.forward_paged(tokens, positions, write_slots, read_slots)
    return out if model.output is None else out.float()


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, *, max_num_seqs: int = 32,
                 kv_cache_tokens: Optional[int] = 16384, kv_cache_gb: Optional[float] = None,
                 block_size: int = 16, max_num_batched_tokens: int = 256, compile: bool = False,
                 layout: Optional[tp.Layout] = None):
        """model: loaded (checkpoint.load_model); its cache is replaced by a paged one. tokenizer: for
        end tokens, stop strings and text (optional: without it, requests stop at max_tokens only).
        kv_cache_gb, when given, sizes the pool by memory instead of kv_cache_tokens.
        max_num_batched_tokens: the per-step token budget (decodes take one each, prompts the rest).
        layout: this rank's place in a pipeline (tp.init(device, pp)), the model being its stage."""
        args = model.args
        if max_num_seqs < 1 or max_num_batched_tokens < max_num_seqs:
            raise UsageError("max_num_seqs must be >= 1 and max_num_batched_tokens >= max_num_seqs")
        if block_size not in (8, 16, 32, 64, 128):
            raise UsageError(f"block_size must be 8, 16, 32, 64 or 128, not {block_size}")
        dtype, self.device = model.dtype_device()
        if kv_cache_gb is not None:
            per_token = 2 * len(model.layers) * args.n_kv_heads * args.head_dim * dtype.itemsize
            kv_cache_tokens = int(kv_cache_gb * 1e9 / per_token)
        num_blocks = (kv_cache_tokens or 0) // block_size
        if num_blocks < 1:
            raise UsageError(f"a KV cache of {kv_cache_tokens} tokens holds no block of {block_size}")
        self.model, self.tokenizer = model, tokenizer
        self.layout = layout if layout is not None and layout.pp > 1 else None
        self.links = pp.Links(layout, self.device) if self.layout else None
        self.block_size, self.num_blocks = block_size, num_blocks
        model.setup_paged_cache(num_blocks + 1, block_size)  # the extra block: scratch for padding rows
        self.scratch_block = num_blocks
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        # Decode batches are padded to these sizes: one compiled graph each.
        self.buckets = sorted({min(1 << i, max_num_seqs) for i in range(max_num_seqs.bit_length() + 1)})
        # Compiled: on the CPU, where qkernels.cpp is built, a decode.ExportedStep per batch size, its
        # attended length symbolic (the read slots' second dimension), found on disk by later processes
        # whatever their pool's size (its pools are inputs); else torch.compile's. Attention is
        # qkernels.cpp's where that is built, else PyTorch's kernel: either reads the gathered K/V once,
        # where Inductor's loops over a few queries (decode.inductor_options) would gather them again for
        # each query row.
        self.decode_fn = (Steps(model).compiled_for(model, paged_logits, None, symbolic_dims=[(3, 1)],
                                                    loop_attention=False) if compile else paged_logits)
        self.eos_ids = set(tokenizer.eos_ids) if tokenizer is not None else set()
        self.seqs, self.streams, self.pending, self.groups = {}, {}, [], {}
        self.ids = itertools.count()
        self.tokens_generated = self.tokens_prompt = 0
        self.world, self.rank = tp.world_size(), tp.rank()
        self.calls = []  # rank 0's add_request / abort calls, to broadcast at the next step (torchrun)
        self.stopped = False  # set on every rank by rank 0's stop()

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str, device="cpu", dtype=torch.float32, layout=None, **kwargs) -> "Engine":
        model = load_model(checkpoint_dir, device=device, dtype=dtype, layout=layout)
        return cls(model, load_tokenizer(checkpoint_dir), layout=layout, **kwargs)

    # -----------------------------------------------------------------------------------------------------
    # Requests

    def add_request(self, prompt_token_ids: list, params=SamplingParams(), request_id: Optional[str] = None) -> str:
        """Queue a request; it joins the running batch as soon as there is room. Returns its id. params: a
        SamplingParams, or a BeamParams for beam search. Refuses, with a UsageError, a request that could
        never run: too long for the context or the whole cache."""
        if not isinstance(params, (SamplingParams, BeamParams)):
            raise UsageError("params must be a SamplingParams or a BeamParams")
        beams = params.num_beams if isinstance(params, BeamParams) else 1
        if beams > 1 and self.layout:
            raise UsageError("beam search does not run in a pipelined engine", "num_beams")
        prompt = list(prompt_token_ids)
        vocab = self.model.args.vocab_size
        if not prompt or not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            raise UsageError(f"a prompt is a non-empty list of token ids in [0, {vocab})", "prompt")
        need = len(prompt) + params.max_tokens
        if need > self.model.args.max_seq_len:
            raise UsageError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                             f"the model's context of {self.model.args.max_seq_len} tokens", "max_tokens")
        if beams * -(-need // self.block_size) > self.num_blocks:
            raise UsageError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                             f"the KV cache of {self.num_blocks * self.block_size} tokens"
                             + (f" for {beams} beams" if beams > 1 else ""), "max_tokens")
        if beams > self.scheduler.max_num_seqs:
            raise UsageError(f"num_beams ({beams}) exceeds max_num_seqs ({self.scheduler.max_num_seqs})", "num_beams")
        if isinstance(params, SamplingParams) and params.stop and self.tokenizer is None:
            raise UsageError("stop strings need the engine to have a tokenizer", "stop")
        request_id = str(next(self.ids)) if request_id is None else str(request_id)
        if request_id in self.seqs or any(c[1] == request_id for c in self.calls if c[0] == "add"):
            raise UsageError(f"request id {request_id!r} is already in use")
        if self.world > 1:
            if self.rank == 0:
                self.calls.append(["add", request_id, prompt, asdict(params), type(params).__name__])
            return request_id
        self._add(request_id, prompt, params)
        return request_id

    def _add(self, request_id: str, prompt: list, params):
        beam = params if isinstance(params, BeamParams) else None
        if beam:
            params = SamplingParams(max_tokens=beam.max_tokens)
        seq = Sequence(request_id, prompt, params, self.device)
        self.tokens_prompt += len(prompt)
        if beam:
            seq.width = beam.num_beams  # room for its beams from the start
            self.groups[request_id] = BeamGroup(BeamState(beam, 1, self.eos_ids, self.device), [seq])
        if params.max_tokens == 0:
            self.pending.append(self._output(seq, [], "", "length"))
            return
        self.seqs[request_id] = seq
        if self.tokenizer is not None and not beam:
            self.streams[request_id] = TextStream(self.tokenizer, params.stop, params.min_tokens)
        self.scheduler.add(seq)

    def abort(self, request_id: str):
        """End a request now; the next step reports it finished with reason "abort". Unknown or finished
        requests are ignored."""
        if self.world > 1:
            if self.rank == 0:
                self.calls.append(["abort", str(request_id)])
            return
        self._abort(str(request_id))

    def _abort(self, request_id: str):
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            group = self.groups.pop(request_id, None)  # a beam search's beams, or the one sequence
            for s in group.beams if group else [seq]:
                self.scheduler.remove(s)
            self.streams.pop(seq.request_id, None)
            self.pending.append(self._output(seq, [], "", "abort"))

    def has_unfinished(self) -> bool:
        return bool(self.seqs or self.pending or self.calls)

    def stop(self):
        """Under torchrun, on rank 0: tell the other ranks, stepping in a loop, that serving is over."""
        if self.world > 1 and self.rank == 0:
            self.calls.append(["stop"])
            self._sync_calls()

    def _sync_calls(self):
        """Under torchrun: carry out rank 0's calls since the last step, on every rank, in order."""
        import torch.distributed as dist
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        payload = json.dumps(self.calls).encode() if self.rank == 0 else b""
        size = torch.tensor([len(payload)], device=dev)
        dist.broadcast(size, src=0)
        data = (torch.tensor(list(payload), dtype=torch.uint8, device=dev) if self.rank == 0
                else torch.empty(int(size), dtype=torch.uint8, device=dev))
        if int(size):
            dist.broadcast(data, src=0)
        self.calls = []
        for call in json.loads(bytes(data.tolist()) or b"[]"):
            if call[0] == "add":
                self._add(call[1], call[2], (BeamParams if call[4] == "BeamParams" else SamplingParams)(**call[3]))
            elif call[0] == "abort":
                self._abort(call[1])
            else:
                self.stopped = True

    # -----------------------------------------------------------------------------------------------------
    # One step

    def step(self) -> list:
        """Run one scheduler iteration; one RequestOutput per request that produced a token or ended."""
        if self.world > 1:
            self._sync_calls()
        outputs, self.pending = self.pending, []
        plan = self.scheduler.schedule()
        if not plan.work:
            return outputs
        self._copy_blocks(plan.copies)
        sampled, rows = [], []  # sequences whose next token is due, and their logits
        with torch.inference_mode():
            decodes = [seq for seq, _ in plan.work if seq.num_uncomputed == 1]
            for seq, n in plan.work:
                if seq.num_uncomputed > 1:  # a prompt (or a recomputation), in chunks: a forward of its own
                    logits = self._prefill(seq, n)
                    self.scheduler.computed(seq, n)
                    if seq.num_uncomputed == 0:
                        sampled.append(seq)
                        rows.append(logits)
            if decodes:
                rows.append(self._decode(decodes))
                for seq in decodes:
                    self.scheduler.computed(seq, 1)
                sampled += decodes
            if not sampled:
                return outputs
            if self.layout and not self.layout.last:  # the last stage samples; its tokens come below
                tokens = self._last_stage_tokens(None, len(sampled))
                return outputs + [self._append(seq, token) for seq, token in zip(sampled, tokens)]
            logits = torch.cat(rows)
            beam_rows = [i for i, s in enumerate(sampled) if s.request_id in self.groups]
            if beam_rows:  # beams go to their searches, the rest are sampled
                plain = [i for i in range(len(sampled)) if i not in beam_rows]
                outputs += self._beam_step([sampled[i] for i in beam_rows], logits[beam_rows])
                sampled, logits = [sampled[i] for i in plain], logits[plain]
                if not sampled:
                    return outputs
            eos = list(self.eos_ids)
            for i, seq in enumerate(sampled):  # min_tokens: no end token yet
                if eos and seq.num_generated < seq.params.min_tokens and not seq.params.ignore_eos:
                    logits[i, eos] = float("-inf")
            tokens = sample_rows(logits, [s.params for s in sampled], [s.generator for s in sampled])
            if self.layout:
                tokens = self._last_stage_tokens(tokens, len(sampled))
        for seq, token in zip(sampled, tokens):
            outputs.append(self._append(seq, token))
        return outputs

    def _forward(self, fn, tokens, positions, write, read):
        """One forward through this rank's model: logits [B, vocab]; in a pipeline, the previous stage's
        hidden states in for the tokens, and on a stage before the last, its own sent on (returns None)."""
        if self.layout and not self.layout.first:
            tokens = self.links.recv((*tokens.shape, self.model.args.dim), self.model.dtype_device()[0],
                                     self.links.prev)
        out = fn(self.model, tokens, positions, write, read)
        if self.layout and not self.layout.last:
            self.links.send(out, self.links.next)
            return None
        return out

    def _last_stage_tokens(self, tokens, n: int) -> list:
        """The last stage's sampled tokens, on every rank of the pipeline."""
        import torch.distributed as dist
        shared = torch.tensor(tokens if tokens is not None else [0] * n, dtype=torch.long)
        dist.broadcast(shared, src=(self.layout.pp - 1) * self.layout.tp)
        self.links.finish()
        return shared.tolist()

    def _beam_step(self, seqs: list, logits: torch.Tensor) -> list:
        """Beams whose next-token logits are in: each group whose beams all have theirs chooses its next
        beams, which fork their parents' blocks, or ends. Returns the outputs of the groups that end."""
        outputs = []
        log_probs = torch.log_softmax(logits, dim=-1)
        for seq, row in zip(seqs, log_probs):
            self.groups[seq.request_id].log_probs[seq] = row
        for rid in dict.fromkeys(s.request_id for s in seqs):  # in order: every rank the same (torchrun)
            group = self.groups[rid]
            if len(group.log_probs) < len(group.beams):
                continue  # a beam is still waiting (preempted): wait for it
            K = group.state.K
            rows = torch.stack([group.log_probs[s] for s in group.beams]).expand(K, -1)  # first step: one row
            group.log_probs.clear()
            done, parents, tokens = group.state.advance(rows)
            self.tokens_generated += K
            if done:
                outputs.append(self._end_beams(rid, group))
                continue
            children = []
            for p, token in zip(parents, tokens):
                parent = group.beams[p if len(group.beams) > 1 else 0]
                child = Sequence(rid, parent.tokens[:parent.num_prompt_tokens], parent.params, self.device)
                child.tokens = parent.tokens + [token]
                child.admitted_once, child.num_cached_prompt_tokens = True, parent.num_cached_prompt_tokens
                self.blocks.fork(parent, child)
                children.append(child)
            self.scheduler.replace(group.beams, children)
            group.beams = children
        return outputs

    def _end_beams(self, rid: str, group: BeamGroup) -> RequestOutput:
        for seq in group.beams:
            self.scheduler.remove(seq)
        del self.groups[rid]
        seq = self.seqs.pop(rid)
        hypotheses = group.state.results()[0]
        best = hypotheses[0].token_ids
        ended = bool(best) and best[-1] in self.eos_ids
        text = self.tokenizer.decode(best[:-1] if ended else best) if self.tokenizer is not None else ""
        out = self._output(seq, best, text, "stop" if ended else "length")
        out.hypotheses = hypotheses
        return out

    def _copy_blocks(self, copies):
        if not copies:
            return
        bs = self.block_size
        src = torch.tensor([s * bs + i for s, _ in copies for i in range(bs)], device=self.device)
        dst = torch.tensor([d * bs + i for _, d in copies for i in range(bs)], device=self.device)
        for layer in self.model.layers:
            cache = layer.attention.kv_cache
            cache.k_cache[dst] = cache.k_cache[src]
            cache.v_cache[dst] = cache.v_cache[src]

    def _slots(self, seq: Sequence, start: int, end: int) -> list:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _prefill(self, seq: Sequence, n: int) -> torch.Tensor:
        """Feed tokens num_computed .. num_computed + n - 1 of seq; the logits after the last [1, vocab]."""
        c, dev = seq.num_computed, self.device
        tokens = torch.tensor([seq.tokens[c:c + n]], device=dev)
        positions = torch.arange(c, c + n, device=dev)[None]
        write = torch.tensor([self._slots(seq, c, c + n)], device=dev)
        read = torch.tensor([self._slots(seq, 0, c + n)], device=dev)
        return self._forward(paged_logits, tokens, positions, write, read)

    def _decode(self, seqs: list) -> torch.Tensor:
        """One token for each sequence, as one batch padded to a bucket size -> logits [len(seqs), vocab]."""
        B = next(b for b in self.buckets if b >= len(seqs))
        bs, pad = self.block_size, B - len(seqs)
        # Rows read the slots of positions 0..L-1, L rounded up so that its changes are few; the mask
        # hides what lies past each row's text, and the scratch block stands in for missing blocks.
        L = -(-max(len(s.tokens) for s in seqs) // KV_BLOCK) * KV_BLOCK
        tables = [s.block_table + [self.scratch_block] * (L // bs - len(s.block_table)) for s in seqs]
        tables += [[self.scratch_block] * (L // bs)] * pad
        dev = self.device
        tables = torch.tensor(tables, device=dev)
        read = (tables[:, :, None] * bs + torch.arange(bs, device=dev)).view(B, L)
        last = [len(s.tokens) - 1 for s in seqs]
        tokens = torch.tensor([[s.tokens[-1]] for s in seqs] + [[0]] * pad, device=dev)
        positions = torch.tensor([[p] for p in last] + [[0]] * pad, device=dev)
        write = torch.tensor([self._slots(s, p, p + 1) for s, p in zip(seqs, last)]
                             + [[self.scratch_block * bs]] * pad, device=dev)
        out = self._forward(self.decode_fn, tokens, positions, write, read)
        return None if out is None else out[:len(seqs)]

    def _append(self, seq: Sequence, token: int) -> RequestOutput:
        seq.tokens.append(token)
        self.tokens_generated += 1
        stream = self.streams.get(seq.request_id)
        reason, text = None, ""
        if token in self.eos_ids and not seq.params.ignore_eos:
            reason = "stop"
        elif stream is not None:
            text = stream.add(token)
            if stream.stopped:
                reason = "stop"
        if reason is None and (seq.num_generated >= seq.params.max_tokens
                               or len(seq.tokens) >= self.model.args.max_seq_len):
            reason = "length"
        if reason is not None:
            if stream is not None:
                text += stream.flush()
            self.scheduler.remove(seq)
            del self.seqs[seq.request_id]
            self.streams.pop(seq.request_id, None)
        return self._output(seq, [token], text, reason)

    @staticmethod
    def _output(seq: Sequence, new_tokens: list, text: str, reason: Optional[str]) -> RequestOutput:
        if reason is not None:
            seq.status, seq.finish_reason = Status.FINISHED, reason
        return RequestOutput(seq.request_id, new_tokens, text, reason is not None, reason,
                             seq.num_prompt_tokens, seq.num_cached_prompt_tokens)

    # -----------------------------------------------------------------------------------------------------
    # Offline use and figures

    def generate(self, prompts: list, params=SamplingParams()) -> list:
        """Run every prompt (a list of token-id lists) to the end; one Completion per prompt, in order.
        params: one SamplingParams for all, or a list with one per prompt."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        tokens, texts, done = {i: [] for i in ids}, {i: "" for i in ids}, {}
        while len(done) < len(ids):
            for out in self.step():
                if out.request_id in tokens:
                    tokens[out.request_id] += out.new_token_ids
                    texts[out.request_id] += out.text
                    if out.finished:
                        done[out.request_id] = out
        return [Completion(i, tokens[i], texts[i], done[i].finish_reason, done[i].num_prompt_tokens,
                           done[i].num_cached_tokens, done[i].hypotheses) for i in ids]

    def warm_up(self):
        """Compile the decode step for every batch size now, with padding rows only, rather than when
        each size first occurs."""
        bs, dev = self.block_size, self.device
        with torch.inference_mode():
            for B in self.buckets:
                scratch = torch.full((B, 1), self.scratch_block * bs, device=dev)
                read = scratch.expand(B, KV_BLOCK).contiguous()
                x = (torch.zeros(B, 1, dtype=torch.long, device=dev) if self.layout is None or self.layout.first
                     else torch.zeros(B, 1, self.model.args.dim, dtype=self.model.dtype_device()[0], device=dev))
                self.decode_fn(self.model, x, torch.zeros(B, 1, dtype=torch.long, device=dev), scratch, read)

    def stats(self) -> dict:
        """Counts now, and since the engine started. kv_slot_utilization: the share of the slots of the
        blocks in use that hold a token (a block shared by several requests counts once)."""
        bs, filled = self.block_size, {}
        for seq in self.scheduler.running:
            for i, block in enumerate(seq.block_table):
                filled[block] = max(filled.get(block, 0), min(bs, max(0, seq.num_computed - i * bs)))
        used = self.num_blocks - self.blocks.num_free
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_used": used, "kv_blocks_total": self.num_blocks, "block_size": bs,
                "kv_slot_utilization": sum(filled.values()) / (used * bs) if used else 1.0,
                "preemptions": self.scheduler.preemptions,
                "prefix_cache_hit_tokens": self.scheduler.prefix_cache_hit_tokens,
                "prompt_tokens": self.tokens_prompt, "generation_tokens": self.tokens_generated}
