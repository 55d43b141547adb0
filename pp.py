"""Pipeline parallelism (GPipe's micro-batches) for decoding: a model split by layers across the pipeline
stages that torchrun starts, combinable with tensor parallelism inside each stage (a 2-D mesh).

    torchrun --nproc_per_node=2 generate.py --pp 2 --prompt "a" --prompt "b" --micro-batches 2
    torchrun --nproc_per_node=4 generate.py --pp 2 ...            # 2 stages x 2 tensor-parallel ranks

    layout = tp.init(device, pp=2)                      # the mesh ("pp", "tp") and this rank's place in it
    model = load_model(DIR, layout=layout)             # this stage's layers only (and its slices of them)
    model.setup_caches(max_batch_size=len(prompts), max_seq_length=256)
    steps = pp.PipelineSteps(model, compile=True)     # this stage's decode step, compiled
    for tokens in pp.generate(model, layout, prompts, params, micro_batches=2, eos_ids=tok.eos_ids, steps=steps):
        ...                                             # on the first stage: one id per row per step

The batch is cut into M micro-batches, each with its own rows of every stage's KV cache. Stage r runs
micro-batch m of step t at tick t * M + m + r: its hidden states go on to stage r + 1, and the last
stage's sampled tokens come back to the first stage, which feeds them in at step t + 1. With M >= P
stages, every stage has work at every tick once the pipeline is full: the fill and drain are paid once
per generation, not once per token. A micro-batch whose rows have all ended is skipped from then on, and
when every one has ended the first stage tells the others to stop.

Why our own sends rather than torch.distributed.pipelining: its schedules run a training step, forward
and backward, over the micro-batches of one fixed batch; decoding feeds each step's output back in as the
next step's input, keeps a KV cache per micro-batch and ends rows one by one, which they do not express.
Messages are point-to-point (isend / recv) between the ranks at the same tensor-parallel rank of
neighbouring stages: a header (run, skip or stop), then the hidden states; tokens from the last stage to
the first.
"""
import time
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from decode import DynamicInt, Steps, attended_length
from errors import UsageError
from sampling import SamplingParams, sample
from tp import Layout

RUN, SKIP, STOP = 1, 0, -1


def micro_batch_rows(batch: int, micro_batches: int) -> list:
    """The rows of each micro-batch: contiguous ranges, as even as possible."""
    size, extra = divmod(batch, micro_batches)
    starts = [m * size + min(m, extra) for m in range(micro_batches + 1)]
    return [range(starts[m], starts[m + 1]) for m in range(micro_batches)]


class Links:
    """The point-to-point messages of one rank: to the next stage, from the previous one, and tokens from
    the last stage to the first. Sends are asynchronous (a ring of blocking sends could deadlock); each
    tensor is kept until its send completes."""

    def __init__(self, layout: Layout, device):
        self.device, self.sending = device, []
        self.next = layout.rank_of(layout.stage + 1) if not layout.last else None
        self.prev = layout.rank_of(layout.stage - 1) if not layout.first else None
        self.first, self.last = layout.rank_of(0), layout.rank_of(layout.pp - 1)
        # gloo moves CPU tensors only; NCCL moves GPU tensors
        self.wire = device if device.type == "cuda" else torch.device("cpu")

    def send(self, tensor, dst: int):
        tensor = tensor.to(self.wire).contiguous()
        self.sending = [(h, t) for h, t in self.sending if not h.is_completed()]
        self.sending.append((dist.isend(tensor, dst), tensor))

    def recv(self, shape, dtype, src: int):
        tensor = torch.empty(shape, dtype=dtype, device=self.wire)
        dist.recv(tensor, src)
        return tensor.to(self.device)

    def send_header(self, kind: int):
        self.send(torch.tensor([kind]), self.next)

    def recv_header(self) -> int:
        return int(self.recv((1,), torch.long, self.prev))

    def finish(self):
        for handle, _ in self.sending:
            handle.wait()
        self.sending = []


def stage_step(model, x, input_pos, left_pad, kv_len, first_row, temperature, top_k, top_p):
    """One step of a micro-batch through this stage: tokens [b, S] (first stage) or hidden states
    [b, S, dim] in; hidden states [b, S, dim] out, or, on the last stage, the next token per row [b]."""
    out = model(x, input_pos, left_pad, kv_len, last_only=True, first_row=first_row)
    return out if model.output is None else sample(out[:, -1], temperature, top_k, top_p)


class PipelineSteps(Steps):
    """A stage's steps: prefill eager (each prompt length its own shape), decode compiled or not. The
    micro-batch's first cache row is a symbolic size, so micro-batches share a graph per row count."""
    prefill_fn = decode_fn = staticmethod(stage_step)


def check(model, layout: Layout, batch: int, micro_batches: int):
    if not 1 <= micro_batches <= batch:
        raise UsageError(f"micro_batches must be in [1, {batch}] for a batch of {batch}, not {micro_batches}")
    if batch > model.max_batch_size:
        raise UsageError(f"the KV cache has {model.max_batch_size} rows, the batch {batch}")


def forward(model, layout: Layout, prompt_tokens: list, micro_batches: int = 1) -> Optional[torch.Tensor]:
    """The logits [B, T, vocab] of a batch of prompts, left-padded to the longest (T), computed through
    the pipeline in micro-batches from cache position 0. Every rank calls it; the last stage returns the
    logits, the others None."""
    rows = [list(p) for p in prompt_tokens]
    B, T = len(rows), max(len(r) for r in rows)
    check(model, layout, B, micro_batches)
    dtype, device = model.dtype_device()
    pad = torch.tensor([T - len(r) for r in rows], device=device)
    links, logits = Links(layout, device), []
    with torch.inference_mode():
        for part in micro_batch_rows(B, micro_batches):
            if layout.first:
                x = torch.tensor([[0] * (T - len(rows[i])) + rows[i] for i in part], device=device)
            else:
                x = links.recv((len(part), T, model.args.dim), dtype, links.prev)
            out = model(x, torch.arange(T, device=device), pad[part.start:part.stop], first_row=part.start)
            if layout.last:
                logits.append(out)
            else:
                links.send(out, links.next)
    links.finish()
    return torch.cat(logits) if layout.last else None


def generate(model, layout: Layout, prompt_tokens: list, params: SamplingParams = SamplingParams(), *,
             micro_batches: int = 1, eos_ids=(), stats: Optional[dict] = None,
             steps: Optional[PipelineSteps] = None) -> Iterator:
    """Every rank of the pipeline calls this with the same arguments. On the first stage it yields, at
    each step, a list with one new id per row (None for a row that has ended), as decode.generate does
    for a batch; on the other stages it yields nothing and returns when the generation is over. The first
    stage's caller may stop reading at any step: the other stages are then told to stop.
    stats, when given, receives on every rank each rank's share of time spent computing (busy_share).
    steps: this stage's PipelineSteps (eager ones when None)."""
    if layout.pp < 2:
        raise UsageError("pp.generate needs a pipeline of two stages or more (decode.generate runs one)")
    rows = [list(p) for p in prompt_tokens]
    if not rows or any(len(r) == 0 for r in rows):
        raise UsageError("empty prompt")
    B, T, max_new, M = len(rows), max(len(r) for r in rows), params.max_tokens, micro_batches
    check(model, layout, B, M)
    if T + max_new - 1 > model.max_seq_length:
        raise UsageError(f"the KV cache ({model.max_seq_length} positions) is too small for prompts of up to "
                         f"{T} tokens plus {max_new} new tokens")
    if max_new <= 0:
        return
    dtype, device = model.dtype_device()
    parts = micro_batch_rows(B, M)
    pad = [T - len(r) for r in rows]
    left_pad = torch.tensor(pad, device=device) if any(pad) else None
    rows = [[0] * p + r for p, r in zip(pad, rows)]
    pads = [None if left_pad is None else left_pad[p.start:p.stop] for p in parts]
    eos_ids = () if params.ignore_eos else set(eos_ids)
    links, steps = Links(layout, device), steps or PipelineSteps(model)
    if layout.last and params.seed is not None:
        torch.manual_seed(params.seed)
    busy, started = 0.0, time.perf_counter()

    def run(m: int, t: int, x):
        """Micro-batch m through this stage's layers at step t -> hidden states, or its next tokens."""
        nonlocal busy
        t0 = time.perf_counter()
        pos = torch.arange(T, device=device) if t == 0 else torch.tensor([T + t - 1], device=device)
        step = steps.prefill if t == 0 else steps.decode
        with torch.inference_mode():
            out = step(model, x, pos, pads[m], attended_length(model, T + t), DynamicInt(parts[m].start),
                       params.temperature, params.top_k, params.top_p)
        busy += time.perf_counter() - t0
        return out

    # The first stage's state: which rows have ended, which micro-batches still run, what each feeds next.
    finished, running, fed = [False] * B, [True] * M, [None] * M
    in_flight = []  # micro-batches whose tokens the last stage has yet to send back

    def receive(m: int, step: list):
        in_flight.remove(m)
        tokens = links.recv((len(parts[m]),), torch.long, links.last).tolist()
        for i, token in zip(parts[m], tokens):
            if not finished[i]:
                step[i] = token
                finished[i] = token in eos_ids
        fed[m] = torch.tensor(tokens, device=device)[:, None]
        running[m] = not all(finished[i] for i in parts[m])

    completed = False  # every stage ran all max_new steps: nobody waits for a stop
    try:
        if layout.first:
            for t in range(max_new):
                step = [None] * B  # the tokens of step t - 1, as they come back
                for m in range(M):
                    if m in in_flight:
                        receive(m, step)
                    if not any(running):  # then nothing is in flight either
                        break
                    if not running[m]:
                        links.send_header(SKIP)
                        continue
                    x = torch.tensor([rows[i] for i in parts[m]], device=device) if t == 0 else fed[m]
                    links.send_header(RUN)
                    links.send(run(m, t, x), links.next)
                    in_flight.append(m)
                if t > 0:
                    yield step
                if not any(running):
                    break
            else:
                step = [None] * B
                for m in list(in_flight):
                    receive(m, step)
                completed = True
                yield step
        else:
            for t in range(max_new):
                for m in range(M):
                    kind = links.recv_header()
                    if not layout.last:
                        links.send_header(kind)
                    if kind == STOP:
                        return
                    if kind == RUN:
                        shape = (len(parts[m]), T if t == 0 else 1, model.args.dim)
                        out = run(m, t, links.recv(shape, dtype, links.prev))
                        links.send(out, links.first if layout.last else links.next)
    finally:
        if layout.first and not completed:  # ended early: collect what is in flight, then stop the others
            for m in list(in_flight):
                receive(m, [None] * B)
            links.send_header(STOP)
        links.finish()
        if stats is not None:
            shares = [None] * dist.get_world_size()
            dist.all_gather_object(shares, busy / max(time.perf_counter() - started, 1e-9))
            stats["busy_share"] = shares
