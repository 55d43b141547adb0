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

With pipeline parallelism (pp.py) the world is a 2-D mesh ("pp", "tp"): pp stages of tp ranks each, and
the tensor-parallel collectives run within a stage's group, which init() takes from the mesh.
"""
import atexit
import os
import sys
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


# A rank that waits longer than this for a peer (a collective, a pipeline message) fails instead of hanging.
TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class Layout:
    """Where this process sits in the mesh ("pp", "tp") of world = pp x tp ranks: its pipeline stage and
    its rank among the stage's tensor-parallel ranks. The global rank is stage * tp + tp_rank."""
    pp: int = 1
    tp: int = 1
    stage: int = 0
    tp_rank: int = 0
    tp_group: Optional[object] = None   # the process group of this stage's tensor-parallel ranks

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.pp - 1

    def rank_of(self, stage: int) -> int:
        """The global rank of the process at this tensor-parallel rank in another stage."""
        return stage * self.tp + self.tp_rank

    def stage_layers(self, n_layers: int, head_cost: float = 0.0) -> range:
        """The contiguous layers of this stage, balanced by cost: a layer costs 1, and the last stage's
        output head head_cost more (the head of a small model weighs as much as several layers)."""
        total, bounds = n_layers + head_cost, [0]
        for s in range(1, self.pp):  # cut where the running cost reaches s / pp of the total
            bounds.append(min(max(round(s * total / self.pp), bounds[-1] + 1), n_layers - (self.pp - s)))
        bounds.append(n_layers)
        return range(bounds[self.stage], bounds[self.stage + 1])


def init(device: torch.device, pp: int = 1) -> Layout:
    """Join the process group that torchrun describes in the environment (once) and place this process
    in a mesh of pp pipeline stages; a ValueError when pp does not divide the world."""
    world = world_size()
    if pp < 1 or world % pp:
        raise ValueError(f"{pp} pipeline stages do not divide the world of {world} rank(s)")
    if world == 1:
        return Layout()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        atexit.register(leave)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cuda" if device.type == "cuda" else "cpu", (pp, world // pp),
                            mesh_dim_names=("pp", "tp"))
    return Layout(pp, world // pp, mesh.get_local_rank("pp"), mesh.get_local_rank("tp"), mesh.get_group("tp"))


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


def read_shard(f, name: str, args, layout: Layout, quantization=None) -> torch.Tensor:
    """This rank's part of tensor `name` from an open safetensors file, reading nothing else."""
    parts = name.split(".")
    module, kind = ".".join(parts[2:-1]), parts[-1]
    parallel, ranges = (shard_ranges(module, args, layout.tp_rank, layout.tp) if parts[0] == "layers"
                        else (None, None))
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


def add_all_reduces(model, group):
    """Sum the partial outputs of each rank's attention and MLP slices over the stage's group. Row-parallel
    int8 layers that round their input to 8 bits (qlinear.int8_activation_matmul) first agree on each
    row's range, so that their rounding is one process's."""
    import torch.distributed._functional_collectives as funcol

    def reduce(t, op):
        # Functional collectives in compiled graphs; uncompiled, c10d's own, in place: the functional ones
        # import Dynamo when first called, over a second of every rank's start.
        if torch.compiler.is_compiling():
            return funcol.all_reduce(t, op, group)
        dist.all_reduce(t, dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
        return t

    def all_reduce(module, inputs, output):
        return reduce(output, "sum")

    def row_range(lo, hi):  # [rows, 1] each: the smallest and largest of each row's slices
        both = reduce(torch.cat([-lo, hi], dim=-1), "max")
        return -both[:, :1], both[:, 1:]

    for layer in model.layers:
        layer.attention.register_forward_hook(all_reduce)
        layer.feed_forward.register_forward_hook(all_reduce)
        for row_parallel in (layer.attention.wo, layer.feed_forward.w2):
            if getattr(row_parallel, "weight_sums", None) is not None:
                row_parallel.row_range = row_range


def shared_seed(seed, device: torch.device) -> int:
    """Every rank must sample the same tokens: rank 0's seed (chosen at random if none) for all."""
    value = torch.tensor([seed if seed is not None else torch.seed() % (1 << 62)],
                         device=device if device.type == "cuda" else "cpu")
    dist.broadcast(value, src=0)
    return int(value)
