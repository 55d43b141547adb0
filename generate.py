"""Generate text with a LLaMA-family checkpoint: the command line.

    python generate.py --prompt "Once upon a time"              # the default model, fetched on first use
    python generate.py --checkpoint DIR --chat --prompt "What is the capital of France?"
    python generate.py --checkpoint DIR --prompt "a" --prompt "longer b" --temperature 0.8 --top-p 0.9
    python generate.py --interactive                               # multi-turn chat, KV cache kept
    python generate.py --prompt "The capital of France" --num-beams 4 --num-return-sequences 2 --json
    torchrun --nproc_per_node=4 generate.py --pp 2 --prompt a --prompt b --prompt c --micro-batches 3
    python generate.py --checkpoint BIG --device cuda --gpu-layers 8 --prompt a   # the other layers streamed
    python generate.py --checkpoint BIG --device cpu --max-resident-gb 2 --prompt a   # the rest stays on disk

The work is done by the library files below this one (checkpoint.py loads, decode.py decodes,
speculative.py speculates, beam.py searches, pp.py pipelines, offload.py streams layers); this file turns
flags into their options, prints, and reports speed. For Python, `load_model` and `generate` are
importable from here too:

    from generate import load_model, generate, SamplingParams
"""
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Optional

import torch

import pp
import tp
from beam import BeamParams, BeamSteps, beam_search
from checkpoint import (DTYPES, default_checkpoint, load_model, load_tokenizer, peak_memory_gb, pick_device,
                        pick_dtype, pick_layout, weight_bytes_per_token)
from decode import Steps, TextStream, generate, synchronize
from errors import ArgumentParser, UsageError, run_command
from offload import OffloadOptions, load_offloaded
from sampling import SamplingParams
from speculative import SpeculativeSteps, speculative_generate

__all__ = ["load_model", "generate", "SamplingParams", "Steps", "TextStream", "main"]


@dataclass(frozen=True)
class Options:
    """One run of the command, validated. Sampling options are in `sampling`, as the library takes them."""
    sampling: SamplingParams
    prompts: tuple = ()                      # prompt texts; several run as one batch
    checkpoint: Optional[str] = None         # a converted checkpoint; None: the default model
    chat: bool = False                       # apply the checkpoint's chat template to each prompt
    system: Optional[str] = None             # system message for chat and interactive
    interactive: bool = False                # a multi-turn conversation on the terminal
    num_samples: int = 1                     # samples of the whole batch, one after the other
    device: str = "auto"
    dtype: Optional[str] = None              # None: the device's default (checkpoint.pick_dtype)
    max_seq_len: Optional[int] = None        # KV cache length; None: what the run needs
    compile: bool = False                    # compile the decode step
    compile_prefill: bool = False            # compile prefill too (dynamic shapes)
    json: bool = False                       # one JSON object per prompt instead of the text
    profile: Optional[str] = None            # a profiler trace of the first sample, to this path
    draft: Optional[str] = None              # "ngram": speculative decoding by prompt lookup
    draft_checkpoint: Optional[str] = None   # speculative decoding with this draft model
    speculate_k: int = 3                     # tokens per speculative round (3 beat 4 on an AVX2 CPU: BENCHMARKS.md)
    beam: Optional[BeamParams] = None        # beam search instead of sampling (--num-beams)
    pp: int = 1                              # pipeline stages (under torchrun); the rest is tensor-parallel
    micro_batches: Optional[int] = None      # micro-batches of a pipeline; None: min(prompts, stages)
    offload: Optional[OffloadOptions] = None  # stream layers (--offload, --gpu-layers, --max-resident-gb)

    def __post_init__(self):
        if self.num_samples < 1:
            raise UsageError(f"--num-samples must be >= 1, not {self.num_samples}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r} (choose from {', '.join(DTYPES)})")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise UsageError(f"--max-seq-len must be >= 1, not {self.max_seq_len}")
        if not self.prompts and not self.interactive:
            raise UsageError("give --prompt TEXT (or --interactive)")
        if self.speculative:
            if self.draft and self.draft_checkpoint:
                raise UsageError("give --draft ngram or --draft-checkpoint DIR, not both")
            if self.speculate_k < 1:
                raise UsageError(f"--speculate-k must be >= 1, not {self.speculate_k}")
            if self.interactive or len(self.prompts) > 1:
                raise UsageError("speculative decoding takes one --prompt (no batch, no --interactive)")
        if self.pp < 1:
            raise UsageError(f"--pp must be >= 1, not {self.pp}")
        if self.micro_batches is not None:
            if self.pp == 1:
                raise UsageError("--micro-batches needs --pp 2 or more")
            if not 1 <= self.micro_batches <= len(self.prompts):
                raise UsageError(f"--micro-batches must be in [1, {len(self.prompts)}] (the prompts), "
                                 f"not {self.micro_batches}")
        if self.pp > 1:
            for bad, flag in ((self.interactive, "--interactive"), (self.speculative, "--draft"),
                              (self.beam, "--num-beams"), (self.compile_prefill, "--compile-prefill")):
                if bad:
                    raise UsageError(f"--pp does not combine with {flag}")
        if self.offload:
            for bad, flag in ((self.compile or self.compile_prefill, "--compile"), (self.speculative, "--draft"),
                              (self.pp > 1, "--pp")):
                if bad:  # streamed layers run eagerly, one process, and speculative.py repacks the weights
                    raise UsageError(f"offloading (--offload, --gpu-layers, --max-resident-gb) does not combine "
                                     f"with {flag}")
        if self.beam:
            s = self.sampling
            if not s.greedy or s.top_k is not None or s.top_p is not None:
                raise UsageError("--num-beams searches, it does not sample: drop --temperature, --top-k, --top-p")
            for bad, flag in ((s.stop, "--stop"), (self.interactive, "--interactive"), (self.speculative, "--draft"),
                              (self.num_samples > 1, "--num-samples")):
                if bad:
                    raise UsageError(f"--num-beams does not combine with {flag}")

    @property
    def speculative(self) -> bool:
        return bool(self.draft or self.draft_checkpoint)


def parse_args(argv) -> Options:
    p = ArgumentParser(description="Generate text with a LLaMA-family checkpoint.")
    p.add_argument("--checkpoint", help="converted checkpoint directory (default: SmolLM2-135M-Instruct, fetched once)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat it to run several prompts as one batch")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate --max-new-tokens tokens whatever comes "
                                                            "(for benchmarks)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--system", help="system message for --chat and --interactive")
    p.add_argument("--interactive", action="store_true", help="a multi-turn conversation on the terminal")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (also ROCm), mps")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: bfloat16 on cuda, "
                                                "float16 on mps, float32 on cpu)")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache length (default: what the run needs)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (on the CPU ahead of time where that suits: decode.ExportedStep)")
    p.add_argument("--compile-prefill", action="store_true", help="also compile prefill (dynamic shapes)")
    p.add_argument("--json", action="store_true", help="print one JSON object per sample and prompt, no text")
    p.add_argument("--profile", help="write a PyTorch profiler trace of the first sample to this path")
    p.add_argument("--draft-checkpoint", help="speculative decoding with this draft model (same tokenizer)")
    p.add_argument("--draft", choices=["ngram"], help="speculative decoding with prompt lookup, no draft model")
    p.add_argument("--speculate-k", type=int, default=3, help="tokens proposed per speculative round")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages under torchrun (the rest of the world is "
                                                     "tensor-parallel)")
    p.add_argument("--micro-batches", type=int, help="micro-batches of the pipeline (default: min(prompts, --pp))")
    p.add_argument("--offload", action="store_true", help="on a GPU, stream every layer from pinned CPU memory")
    p.add_argument("--gpu-layers", type=int, help="on a GPU, keep the first N layers resident and stream the others")
    p.add_argument("--max-resident-gb", type=float, help="on the CPU, hold at most this much of the layers' weights "
                                                         "in memory and stream the rest from the checkpoint file")
    p.add_argument("--prefetch", type=int, help="streamed layers brought in while one computes (default 1)")
    p.add_argument("--num-beams", type=int, help="beam search with this many beams per prompt")
    p.add_argument("--length-penalty", type=float, help="beam score = log-prob / length ** this (default 1)")
    p.add_argument("--early-stopping", choices=["true", "false", "never"],
                   help="when beam search stops, as in transformers (default false)")
    p.add_argument("--num-return-sequences", type=int, help="best hypotheses printed per prompt (default 1)")
    p.add_argument("--beam-rel-threshold", type=float, help="prune candidates below this fraction of the best's "
                                                             "probability")
    p.add_argument("--beam-abs-threshold", type=float, help="prune candidates this far below the best's log-prob")
    p.add_argument("--beam-local-threshold", type=float, help="prune candidates whose last token is below this "
                                                               "fraction of the best last token's probability")
    p.add_argument("--beam-max-candidates", type=int, help="at most this many candidates per beam run on")
    a = p.parse_args(argv)
    try:
        sampling = SamplingParams(max_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                                  top_p=a.top_p, seed=a.seed, stop=tuple(a.stop), ignore_eos=a.ignore_eos)
    except UsageError as e:
        raise said_as_flag(e, {"max_tokens": "max_new_tokens"})
    return Options(sampling=sampling, beam=beam_params(a), prompts=tuple(a.prompt or ()), checkpoint=a.checkpoint,
                   chat=a.chat, system=a.system, interactive=a.interactive, num_samples=a.num_samples, device=a.device,
                   dtype=a.dtype, max_seq_len=a.max_seq_len, compile=a.compile, compile_prefill=a.compile_prefill,
                   json=a.json, profile=a.profile, draft=a.draft, draft_checkpoint=a.draft_checkpoint,
                   speculate_k=a.speculate_k, pp=a.pp, micro_batches=a.micro_batches, offload=offload_options(a))


def offload_options(a) -> Optional[OffloadOptions]:
    """The offloading flags as OffloadOptions; None without --offload, --gpu-layers or --max-resident-gb."""
    if not (a.offload or a.gpu_layers is not None or a.max_resident_gb is not None):
        if a.prefetch is not None:
            raise UsageError("--prefetch needs --offload, --gpu-layers or --max-resident-gb")
        return None
    if a.max_resident_gb is not None and (a.offload or a.gpu_layers is not None):
        raise UsageError("--max-resident-gb is for the CPU, --offload and --gpu-layers for a GPU: give one")
    return OffloadOptions(prefetch=OffloadOptions.prefetch if a.prefetch is None else a.prefetch,
                          gpu_layers=a.gpu_layers or 0, max_resident_gb=a.max_resident_gb)


def beam_params(a) -> Optional[BeamParams]:
    """The beam-search flags as BeamParams; None without --num-beams."""
    flags = {"num_beams": "num_beams", "length_penalty": "length_penalty", "early_stopping": "early_stopping",
             "num_return_sequences": "num_return_sequences", "beam_rel_threshold": "rel_threshold",
             "beam_abs_threshold": "abs_threshold", "beam_local_threshold": "local_threshold",
             "beam_max_candidates": "max_candidates"}
    given = {name: getattr(a, name) for name in flags if getattr(a, name) is not None}
    if a.num_beams is None:
        if given:
            raise UsageError(f"--{next(iter(given)).replace('_', '-')} needs --num-beams")
        return None
    given = {flags[name]: value for name, value in given.items()}
    if "early_stopping" in given:
        given["early_stopping"] = {"true": True, "false": False}.get(given["early_stopping"], "never")
    try:
        return BeamParams(max_tokens=a.max_new_tokens, **given)
    except UsageError as e:
        raise said_as_flag(e, {"max_tokens": "max_new_tokens", **{v: k for k, v in flags.items()}})


def said_as_flag(e: UsageError, flags: dict) -> UsageError:
    """An options error, named by its field, said with the flag instead (flags: field -> flag's name,
    where they differ)."""
    return UsageError("--" + flags.get(e.param, e.param).replace("_", "-") + str(e)[len(e.param):])


# ---------------------------------------------------------------------------------------------------------
# Setting up a run


def encode_prompts(o: Options, tok) -> list:
    def encode(text):
        if o.chat:
            system = [{"role": "system", "content": o.system}] if o.system else []
            return tok.encode_chat(system + [{"role": "user", "content": text}])
        return tok.encode_prompt(text)

    prompts_ids = [encode(p) for p in o.prompts]
    if any(not ids for ids in prompts_ids):
        raise UsageError("a prompt is empty")
    return prompts_ids


def cache_length(o: Options, context: int, prompts_ids: list) -> int:
    """KV cache slots for this run: room for the longest prompt and its new tokens (or a chat)."""
    if o.interactive:
        return o.max_seq_len or min(context, 4096)
    longest, max_new = max(map(len, prompts_ids)), o.sampling.max_tokens
    need = longest + max_new
    if need > context:
        raise UsageError(f"the prompt ({longest} tokens) plus --max-new-tokens ({max_new}) exceeds "
                         f"the model's context of {context} tokens")
    # Rounded up so that torch.compile's graphs serve nearby lengths too (a CPU step compiled ahead of time,
    # decode.ExportedStep, serves any).
    cache_len = o.max_seq_len or min(context, -(-need // 256) * 256)
    if need > cache_len:
        raise UsageError(f"--max-seq-len {cache_len} is shorter than the prompt plus --max-new-tokens ({need})")
    return cache_len + (o.speculate_k if o.speculative else 0)  # the verify step writes k slots past the text


def run_beams(o: Options, model, tok, prompts_ids, steps, info: dict) -> list:
    """Beam search over every prompt; print each prompt's best hypotheses, or a JSON object for each."""
    eos_ids = set() if o.sampling.ignore_eos else tok.eos_ids
    stats = {}
    synchronize(steps.device)
    t0 = time.perf_counter()
    results = beam_search(model, prompts_ids, o.beam, eos_ids=eos_ids, steps=steps, stats=stats)
    synchronize(steps.device)
    elapsed = time.perf_counter() - t0
    records = []
    for i, hypotheses in enumerate(results):
        for rank, h in enumerate(hypotheses):
            ids = h.token_ids[:-1] if h.token_ids and h.token_ids[-1] in eos_ids else h.token_ids
            records.append({"prompt": i, "rank": rank, "text": tok.decode(ids), "token_ids": h.token_ids,
                            "score": h.score})
    for r in records:
        if o.json:
            print(json.dumps(r), flush=True)
        elif len(records) == 1:
            print(r["text"], flush=True)
        else:
            print(f"--- prompt {r['prompt'] + 1}, hypothesis {r['rank'] + 1}, score {r['score']:.4f}\n{r['text']}",
                  flush=True)
    n, rows = stats["steps"], len(prompts_ids) * o.beam.num_beams
    print(f"beam search: {len(prompts_ids)} prompt(s) x {o.beam.num_beams} beams, {n} steps in {elapsed:.2f} s, "
          f"{n * rows / elapsed:.1f} hypothesis tok/s | per step: cache reordering "
          f"{stats['reorder_bytes'] / n / 1e6:.2f} "
          f"MB, weights {info['bytes_per_token'] / 1e6:.1f} MB | peak memory {peak_memory_gb(steps.device):.2f} GB | "
          f"compile {info['compile_s']:.1f} s", file=sys.stderr)
    return records


def load_draft(o: Options, model, device, dtype):
    if not o.draft_checkpoint:
        return None
    draft = load_model(o.draft_checkpoint, device=device, dtype=dtype)
    if draft.args.vocab_size != model.args.vocab_size:
        raise UsageError(f"the draft's vocabulary ({draft.args.vocab_size}) differs from the target's "
                         f"({model.args.vocab_size})")
    draft.setup_caches(max_batch_size=1, max_seq_length=model.max_seq_length)
    return draft


def token_steps(o: Options, model, prompts_ids, params: SamplingParams, eos_ids, steps, draft=None, stats=None,
                layout=None):
    """The token iterator of this run: pipelined with --pp, speculative with --draft / --draft-checkpoint,
    else plain."""
    if o.pp > 1:
        M = o.micro_batches or min(len(prompts_ids), o.pp)
        tokens = pp.generate(model, layout, prompts_ids, params, micro_batches=M, eos_ids=eos_ids, stats=stats,
                             steps=steps)
        return tokens if len(prompts_ids) > 1 else (step[0] for step in tokens)
    if o.speculative:
        return speculative_generate(model, prompts_ids[0], params, k=o.speculate_k, draft=draft,
                                    eos_ids=eos_ids, stats=stats, steps=steps)
    return generate(model, prompts_ids if len(prompts_ids) > 1 else prompts_ids[0], params, eos_ids=eos_ids,
                    steps=steps)


def warm_up(o: Options, model, tok, prompts_ids, steps, draft, layout=None) -> float:
    """Run the compiled steps once with the run's shapes, so that the timed run measures decoding, not
    compiling; returns the seconds it took."""
    t0 = time.perf_counter()
    prompts = prompts_ids or [[tok.encode("a")[0]]]
    if o.beam:
        beam_search(model, prompts, replace(o.beam, max_tokens=min(3, o.beam.max_tokens)), steps=steps)
        synchronize(steps.device)
        return time.perf_counter() - t0
    params = replace(o.sampling, max_tokens=min(3 + o.speculate_k, max(o.sampling.max_tokens, 1)), ignore_eos=True)
    for _ in token_steps(o, model, prompts, params, (), steps, draft, layout=layout):
        pass
    synchronize(steps.device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# Running and reporting


def report(stats: dict):
    speculation = (f" | acceptance {stats['acceptance_rate']:.2f}, {stats['tokens_per_target_step']:.2f} tok per "
                   "target step" if "acceptance_rate" in stats else "")
    streaming = (f" | streamed {stats['streamed_layers']} of {stats['streamed_layers'] + stats['resident_layers']} "
                 f"layers, {stats['streamed_mb_per_step']:.1f} MB per step, "
                 + ("mapped in place" if stats["zero_copy"] else "copied") + f" at {stats['transfer_gb_s']:.2f} GB/s"
                 if "streamed_layers" in stats else "")
    print(f"prompt {stats['prompt_tokens']} tok, generated {stats['generated_tokens']} tok | "
          f"ttft {stats['ttft_s'] * 1e3:.1f} ms, prefill {stats['prefill_tok_s']:.1f} tok/s, "
          f"decode {stats['decode_tok_s']:.2f} tok/s, {stats['bandwidth_gb_s']:.2f} GB/s | "
          f"peak memory {stats['peak_memory_gb']:.2f} GB | compile {stats['compile_s']:.1f} s{speculation}{streaming}",
          file=sys.stderr)


def run_batch(o: Options, params: SamplingParams, model, tok, prompts_ids, steps, draft, info: dict,
              layout=None) -> list:
    """Generate one sample for every prompt; stream it when there is one prompt and no --json. info:
    checkpoint, compile_s and bytes_per_token, for the records. layout: this rank's place (torchrun)."""
    batch = len(prompts_ids) > 1
    streams = [TextStream(tok, params.stop) for _ in prompts_ids]
    counts = [0] * len(prompts_ids)
    live = not batch and not o.json
    eos_ids = set() if params.ignore_eos else tok.eos_ids
    stats, ttft = {}, None
    offload = getattr(model, "offload", None)
    streamed_before = offload.stats() if offload else None
    synchronize(steps.device)
    t0 = time.perf_counter()
    for step in token_steps(o, model, prompts_ids, params, tok.eos_ids, steps, draft, stats, layout):
        if ttft is None:
            ttft = time.perf_counter() - t0
        step = step if batch else [step]
        for i, token in enumerate(step):
            if token is None or streams[i].stopped:
                continue
            counts[i] += 1
            if token in eos_ids:
                streams[i].stopped = True
                continue
            delta = streams[i].add(token)
            if live and delta:
                print(delta, end="", flush=True)
        if all(s.stopped for s in streams):
            break
    synchronize(steps.device)
    elapsed = time.perf_counter() - t0
    if live:
        print(streams[0].flush(), flush=True)
    ttft = elapsed if ttft is None else ttft
    n_new = max(counts)
    decode_s = max(elapsed - ttft, 1e-9)
    decode_tok_s = (n_new - 1) / decode_s if n_new > 1 else 0.0
    records = []
    for i, ids in enumerate(prompts_ids):
        records.append({
            "text": streams[i].text, "checkpoint": info["checkpoint"], "prompt_tokens": len(ids),
            "generated_tokens": counts[i], "ttft_s": ttft,
            "prefill_tok_s": sum(map(len, prompts_ids)) / ttft if ttft > 0 else 0.0,
            "decode_tok_s": decode_tok_s,
            "bandwidth_gb_s": info["bytes_per_token"] * decode_tok_s / 1e9,
            "peak_memory_gb": peak_memory_gb(steps.device), "compile_s": info["compile_s"]})
        if offload:  # what was streamed during this run: bytes per forward pass, and how fast they came
            now = offload.stats()
            seconds = now["copy_seconds"] - streamed_before["copy_seconds"]
            records[-1].update(resident_layers=now["resident_layers"], streamed_layers=now["streamed_layers"],
                               prefetch=now["prefetch"], zero_copy=now["zero_copy"],
                               streamed_mb_per_step=now["bytes_per_pass"] / 1e6,
                               transfer_gb_s=(now["bytes_moved"] - streamed_before["bytes_moved"]) / 1e9
                               / max(seconds, 1e-9))
        if "busy_share" in stats:  # each rank's share of the time it computed (pipeline)
            records[-1]["pipeline_busy_share"] = stats["busy_share"]
        elif stats:
            records[-1]["acceptance_rate"] = stats["accepted"] / max(stats["proposed"], 1)
            records[-1]["tokens_per_target_step"] = counts[i] / stats["target_steps"]
    for i, r in enumerate(records):
        if o.json:
            print(json.dumps(r), flush=True)
        elif batch:
            print(f"--- prompt {i + 1}\n{r['text']}", flush=True)
    report(dict(records[0], prompt_tokens=sum(r["prompt_tokens"] for r in records)))
    return records


def interactive(o: Options, params: SamplingParams, model, tok, steps):
    """A chat on the terminal. The KV cache is kept between turns: each turn prefills only its new tokens."""
    messages = [{"role": "system", "content": o.system}] if o.system else []
    fed = []  # every token whose K/V is in the cache, in order
    pending = None  # the last generated token: sampled, not yet fed
    print("nimblelm chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        full = tok.encode_chat(messages)
        history = fed + ([pending] if pending is not None else [])
        if history and full[:len(history)] == history:
            new, start = full[len(fed):], len(fed)  # begins with the pending token
        else:
            new, start = full, 0  # the template rewrote the past: read it all again
        if start + len(new) + params.max_tokens > model.max_seq_length:
            print("(context full: start a new conversation)", file=sys.stderr)
            break
        stream, reply_ids = TextStream(tok, params.stop), []
        for token in generate(model, new, params, eos_ids=tok.eos_ids, start_pos=start, steps=steps):
            reply_ids.append(token)
            if token in tok.eos_ids:
                break
            print(stream.add(token), end="", flush=True)
            if stream.stopped:
                break
        print(stream.flush(), flush=True)
        fed = (fed[:start] if start else []) + new + reply_ids[:-1]
        pending = reply_ids[-1] if reply_ids else None
        messages.append({"role": "assistant", "content": stream.text})
        params = replace(params, seed=None)  # a seed starts the conversation, not every turn


def main(argv=None):
    o = parse_args(argv)
    checkpoint = o.checkpoint or default_checkpoint()
    device = pick_device(o.device)
    dtype = pick_dtype(o.dtype, device)
    params = o.sampling
    layout = pick_layout(device, o.pp)
    if layout is not None:  # under torchrun: one process per rank, rank 0 speaks for all
        params = replace(params, seed=tp.shared_seed(params.seed, device))
        if tp.rank() > 0:
            sys.stdout = sys.stderr = open(os.devnull, "w")
    if o.offload and layout:
        raise UsageError("offloading runs in one process, not under torchrun")
    if o.offload:
        model = load_offloaded(checkpoint, device, dtype, o.offload)
    else:
        model = load_model(checkpoint, device=device, dtype=dtype, layout=layout)
    tok = load_tokenizer(checkpoint)
    prompts_ids = encode_prompts(o, tok)
    model.setup_caches(max_batch_size=max(1, len(prompts_ids)) * (o.beam.num_beams if o.beam else 1),
                       max_seq_length=cache_length(o, model.args.max_seq_len, prompts_ids))
    draft = load_draft(o, model, device, dtype)
    if o.speculative:
        steps = SpeculativeSteps(model, compile=o.compile or o.compile_prefill, draft=draft)
    elif o.pp > 1:
        steps = pp.PipelineSteps(model, compile=o.compile)
    elif o.beam:
        steps = BeamSteps(model, compile=o.compile or o.compile_prefill, compile_prefill=o.compile_prefill)
    else:
        steps = Steps(model, compile=o.compile or o.compile_prefill, compile_prefill=o.compile_prefill)
    compile_s = warm_up(o, model, tok, prompts_ids, steps, draft, layout) if o.compile or o.compile_prefill else 0.0

    if o.interactive:
        return interactive(o, params, model, tok, steps)
    info = {"checkpoint": checkpoint, "compile_s": compile_s, "bytes_per_token": weight_bytes_per_token(model)}
    if o.beam:
        run_beams(o, model, tok, prompts_ids, steps, info)
        return 0
    for sample_index in range(o.num_samples):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        profiling = o.profile and sample_index == 0
        profiler = torch.profiler.profile() if profiling else nullcontext()
        with profiler:
            # A seed starts the first sample; the others continue from where it left the generator.
            run_batch(o, params if sample_index == 0 else replace(params, seed=None), model, tok, prompts_ids,
                      steps, draft, info, layout)
        if profiling:
            profiler.export_chrome_trace(o.profile)
            print(f"profiler trace written to {o.profile}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    tp.exit_process(run_command(main))
