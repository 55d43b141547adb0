"""Tensor parallelism over torch.distributed: one model split across the processes that torchrun starts.

    torchrun --nproc_per_node=2 generate.py --checkpoint DIR --prompt "..."              # one machine
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_endpoint=HOST:29500 generate.py ...

The flags are generate.py's own; nothing else changes. Megatron-style sharding: each rank holds a slice
of the heads (q/k/v rows, the output projection's matching columns) and of the MLP (gate/up rows, down
columns), so one all-reduce after attention and one after the MLP restore the full activations. Key/value
heads are split too, or, when there are fewer of them than ranks, each rank keeps the one its query heads
use. Embedding, norms and output head are replicated. Collectives are the functional ones, which
torch.compile traces into the graph. Backend: NCCL on CUDA (RCCL on ROCm), gloo on the CPU.

Each rank reads only its own slices of the memory-mapped safetensors file, int8 / int4 scales included.
"""
import atexit
import os
import sys
from dataclasses import replace

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def init(device: torch.device):
    """Join the process group that torchrun describes in the environment (once)."""
    if world_size() > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(leave)


def leave():
    """Leave the group together before the interpreter tears down: a rank whose gloo group is still
    connected to a peer at exit can abort ("terminate called without an active exception")."""
    dist.barrier()
    dist.destroy_process_group()


def exit_process(code: int):
    """End a command-line run. Under torchrun: after a barrier every rank is done with collectives, and
    the process ends without the interpreter's teardown, in which gloo's threads could still abort it
    (rare, but seen even with leave())."""
    if world_size() == 1:
        sys.exit(code)
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def local_args(args, world: int, quantization=None):
    """This rank's share of the architecture, or a ValueError naming the numbers that do not split."""
    if args.n_heads % world:
        raise ValueError(f"cannot split {args.n_heads} query heads over {world} ranks")
    if args.n_kv_heads % world and world % args.n_kv_heads:
        raise ValueError(f"cannot split or replicate {args.n_kv_heads} key/value heads over {world} ranks")
    if args.intermediate_size % world:
        raise ValueError(f"cannot split the MLP's {args.intermediate_size} hidden units over {world} ranks")
    local = replace(args, n_heads=args.n_heads // world, n_kv_heads=max(1, args.n_kv_heads // world),
                    intermediate_size=args.intermediate_size // world)
    groupsize = (quantization or {}).get("groupsize")
    if groupsize:
        for what, n in (("attention output", local.n_heads * local.head_dim), ("MLP", local.intermediate_size)):
            if n % groupsize:
                raise ValueError(f"each rank's {n} {what} inputs are not a whole number of int4 groups of "
                                 f"{groupsize} over {world} ranks")
    return local


def shard_ranges(module: str, args, r: int, world: int):
    """For a sharded module, ("column" | "row", [(start, end), ...]) over its output or input features."""
    H, KV, D, I = args.n_heads, args.n_kv_heads, args.head_dim, args.intermediate_size
    heads, hidden = H // world, I // world
    kv_first, kv_count = (r * heads) // (H // KV), max(1, KV // world)  # the kv heads its q heads use
    if module == "attention.wqkv":
        return "column", [(r * heads * D, (r + 1) * heads * D),
                          ((H + kv_first) * D, (H + kv_first + kv_count) * D),
                          ((H + KV + kv_first) * D, (H + KV + kv_first + kv_count) * D)]
    if module == "attention.wo":
        return "row", [(r * heads * D, (r + 1) * heads * D)]
    if module == "feed_forward.w13":
        return "column", [(r * hidden, (r + 1) * hidden), (I + r * hidden, I + (r + 1) * hidden)]
    if module == "feed_forward.w2":
        return "row", [(r * hidden, (r + 1) * hidden)]
    return None, None


def read_shard(f, name: str, args, quantization=None) -> torch.Tensor:
    """This rank's part of tensor `name` from an open safetensors file, reading nothing else."""
    parts = name.split(".")
    module, kind = ".".join(parts[2:-1]), parts[-1]
    parallel, ranges = shard_ranges(module, args, rank(), world_size()) if parts[0] == "layers" else (None, None)
    if parallel is None:
        return f.get_tensor(name)
    s = f.get_slice(name)
    if parallel == "column":  # output features: rows of weights, entries of biases / scales
        dim = 1 if kind == "scales_and_zeros" else 0
    else:  # input features
        if kind in ("bias", "scales"):  # per output channel: every rank needs all of them
            return f.get_tensor(name)
        if kind == "scales_and_zeros":
            dim, ranges = 0, [(a // quantization["groupsize"], b // quantization["groupsize"]) for a, b in ranges]
        else:
            dim = 1
            if s.get_dtype() == "U8":  # int4: two inputs per byte
                ranges = [(a // 2, b // 2) for a, b in ranges]
    return torch.cat([s[a:b] if dim == 0 else s[:, a:b] for a, b in ranges], dim=dim)


def add_all_reduces(model):
    """Sum the partial outputs of each rank's attention and MLP slices."""
    import torch.distributed._functional_collectives as funcol

    def all_reduce(module, inputs, output):
        return funcol.all_reduce(output, "sum", dist.group.WORLD)

    for layer in model.layers:
        layer.attention.register_forward_hook(all_reduce)
        layer.feed_forward.register_forward_hook(all_reduce)


def shared_seed(seed, device: torch.device) -> int:
    """Every rank must sample the same tokens: rank 0's seed (chosen at random if none) for all."""
    value = torch.tensor([seed if seed is not None else torch.seed() % (1 << 62)],
                         device=device if device.type == "cuda" else "cpu")
    dist.broadcast(value, src=0)
    return int(value)
