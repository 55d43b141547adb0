"""Offloading (FlexGen): run a model whose layers do not all fit in memory by streaming their weights, the
next layers brought in while the current one computes.

    # a GPU: the first 8 layers resident, the others streamed from pinned CPU memory
    model = load_offloaded(DIR, "cuda", torch.bfloat16, OffloadOptions(gpu_layers=8, prefetch=1))
    # the CPU: the layers' weights may hold 2 GB of memory; the rest stays in the file, memory-mapped
    model = load_offloaded(DIR, "cpu", torch.float32, OffloadOptions(max_resident_gb=2.0))
    model.setup_caches(...); generate(model, ...)   # as any model, eagerly
    model.offload.stats()                           # bytes streamed, seconds spent copying

The embedding, the final norm, the output head and the KV cache stay on the device, and so do the first
layers that fit (llama.cpp's --n-gpu-layers). The other layers are streamed at every forward pass, with
prefetch + 1 of them in flight: while layer j computes, the next `prefetch` are being brought in.
- On a GPU their weights wait in pinned CPU memory and are copied on a side stream into a ring of
  prefetch + 1 buffers, each a copy of one layer's modules on the device. The compute stream waits for a
  layer's copy, and a buffer is refilled only after the compute stream is done with it.
- On the CPU they stay in the checkpoint file, memory-mapped. Where the file holds each tensor as it runs
  (its dtype, no repacking), a streamed layer computes straight out of the mapping, as llama.cpp's mmap
  does: a worker thread maps its pages in ahead of its turn (MADV_POPULATE_READ, with the next layer's
  read from disk started by MADV_WILLNEED), and they are dropped from this process once it has run
  (MADV_DONTNEED). Otherwise (a cast, int4's kernel layout or int8's where qkernels.cpp packs it, an int8
  weight the kernel cannot read where it lies) the worker copies each layer into a ring of buffers as on a
  GPU, dropping each tensor's pages once copied. Either way the file's pages stay in the page cache while
  the machine has room, and come from the disk when it has not.
model.py is unchanged: each streamed block gets a forward pre-hook, which waits for its weights and points
its parameters at them, and a forward hook, which lets go of them and starts bringing in the layer
prefetch + 1 further on. Streamed runs are eager: a compiled step would need those hooks in its graph.
"""
import copy
import mmap
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Optional

import torch
import torch.nn as nn

import qlinear
from checkpoint import WeightsFile, build_on_meta, load_model, read_config
from errors import UsageError
from model import Transformer

# Linux's madvise that maps a range's pages in one call (5.14 on; Python's mmap module may not name it).
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)


@dataclass(frozen=True)
class OffloadOptions:
    prefetch: int = 1                         # layers brought in while one computes (0: bring in, then compute)
    gpu_layers: int = 0                       # on a GPU: the first layers kept resident, the others streamed
    max_resident_gb: Optional[float] = None   # on the CPU: what the layers' weights may hold in memory, in GB

    def __post_init__(self):
        if self.prefetch < 0:
            raise UsageError(f"--prefetch must be >= 0, not {self.prefetch}")
        if self.gpu_layers < 0:
            raise UsageError(f"--gpu-layers must be >= 0, not {self.gpu_layers}")
        if self.max_resident_gb is not None and not self.max_resident_gb > 0:
            raise UsageError(f"--max-resident-gb must be > 0, not {self.max_resident_gb}")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


# ---------------------------------------------------------------------------------------------------------
# Where the copies run: a side stream on a GPU, a worker thread on the CPU


class StreamCopier:
    """Copies on a side stream of a GPU, each after the work the compute stream has queued so far (the
    last reader of the buffer it fills)."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.timings = deque()  # (start, end) events of copies not yet added up
        self.seconds = 0.0

    def submit(self, copy):
        buffer_free = torch.cuda.current_stream().record_event()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(buffer_free)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            copy()
            end.record()
        self.timings.append((start, end))
        while self.timings and self.timings[0][1].query():  # add up the copies already done
            self.add_up(*self.timings.popleft())
        return end

    def add_up(self, start, end):
        end.synchronize()
        self.seconds += start.elapsed_time(end) / 1e3

    def wait(self, done):
        torch.cuda.current_stream().wait_event(done)

    def copy_seconds(self) -> float:
        while self.timings:
            self.add_up(*self.timings.popleft())
        return self.seconds


class ThreadCopier:
    """Copies on one worker thread: PyTorch's copies and the page faults of a memory-mapped file run
    without Python's lock, beside the main thread's compute."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="nimblelm-offload")
        self.seconds = 0.0

    def submit(self, copy):
        return self.pool.submit(self.timed, copy)

    @torch.no_grad()  # grad mode is per thread
    def timed(self, copy):
        t = time.perf_counter()
        copy()
        self.seconds += time.perf_counter() - t

    def wait(self, done):
        done.result()

    def copy_seconds(self) -> float:
        return self.seconds


# ---------------------------------------------------------------------------------------------------------
# Where the streamed weights wait: pinned CPU memory, or the memory-mapped checkpoint file


class MappedFile:
    """A safetensors file memory-mapped, its tensors as views, and the kernel told what is needed next
    and what is done with. A private (copy-on-write) mapping, so that the views are writable tensors;
    nothing writes to them."""

    def __init__(self, path: str):
        with WeightsFile(path) as f:  # reads and checks the header
            self.entries, self.base = f.entries, f.base
            self.map = mmap.mmap(f.file.fileno(), 0, access=mmap.ACCESS_COPY)
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)

    def span(self, name: str) -> tuple:
        start, end = self.entries[name]["data_offsets"]
        return self.base + start, end - start

    def dtype(self, name: str) -> torch.dtype:
        return WeightsFile.DTYPES[self.entries[name]["dtype"]]

    def tensor(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        start, size = self.span(name)
        dtype = self.dtype(name)
        if start % dtype.itemsize:
            raise ValueError(f"tensor {name} is not aligned to its {e['dtype']} elements in the file")
        return self.bytes[start:start + size].view(dtype).view(e["shape"])

    def advise(self, names, advice):
        """madvise over the pages holding these tensors (page-aligned outwards: a neighbour's page dropped
        is read again from the page cache when touched)."""
        if advice is None or not hasattr(self.map, "madvise"):  # not on every platform
            return
        for name in names:
            start, size = self.span(name)
            first = start - start % mmap.PAGESIZE
            try:
                self.map.madvise(advice, first, min(start + size - first, len(self.map) - first))
            except OSError:  # an older kernel: the pages are read when first touched instead
                return


def tensors_of(module: nn.Module) -> dict:
    """A block's weights by name: parameters and buffers, but not its KV cache."""
    # every name, also one that shares its tensor with another
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    return {name: t for name, t in named if t is not None and ".kv_cache." not in f".{name}"}


class Pointer:
    """Points a block's parameters and buffers at other tensors, by name."""

    def __init__(self, block: nn.Module, names: list):
        self.targets = []  # (module's parameters or buffers dict, attribute, name)
        for name in names:
            prefix, _, attr = name.rpartition(".")
            module = block.get_submodule(prefix)
            self.targets.append((module._parameters if attr in module._parameters else module._buffers, attr, name))

    def __call__(self, tensors: dict):
        for where, attr, name in self.targets:
            where[attr] = tensors[name]


class MappedLayers:
    """Zero copy (the CPU, where the file holds each tensor as it runs): every streamed block computes out
    of its own views of the mapped file. A slot is a layer in flight: its pages mapped in ahead of its turn
    (MADV_POPULATE_READ, the next layer's read from disk started with MADV_WILLNEED), and dropped from this
    process once it has run (MADV_DONTNEED); the page cache keeps them while the machine has room."""

    def __init__(self, mapped: MappedFile, blocks: list, names: list, slots: int):
        self.mapped, self.names, self.slots = mapped, names, slots
        self.tensors = [{n: mapped.tensor(full) for n, full in layer.items()} for layer in names]
        for j, (block, layer) in enumerate(zip(blocks, self.tensors)):
            kinds = tensors_of(block)
            Pointer(block, list(layer))({n: nn.Parameter(t, requires_grad=False) if isinstance(kinds[n], nn.Parameter)
                                         else t for n, t in layer.items()})
            qlinear.prepare(block)  # what it adds (int8's weight sums) is small and stays resident
            self.release(j)

    def fill(self, slot: int, j: int):
        self.mapped.advise(self.names[(j + 1) % len(self.names)].values(), mmap.MADV_WILLNEED)
        self.mapped.advise(self.names[j].values(), MADV_POPULATE_READ)

    def bind(self, j: int, slot: int):
        pass  # each block has its own views

    def release(self, j: int):
        self.mapped.advise(self.names[j].values(), mmap.MADV_DONTNEED)


class Buffers:
    """A ring of buffers, each a copy of one block's modules on the device; a block computes out of the
    buffer its weights were copied into. Subclasses say where the copies come from (fill)."""

    def __init__(self, blocks: list, buffers: list):
        self.buffers, self.slots = buffers, len(buffers)
        self.buffer_tensors = [tensors_of(b) for b in buffers]
        self.pointers = [Pointer(block, list(self.buffer_tensors[0])) for block in blocks]
        # what qlinear.prepare chose for a buffer's layers (not tensors) holds for theirs: the kernels and up
        # to how many rows they run, and the class (a float layer that became FloatLinear)
        for block in blocks:
            for mine, theirs in zip(block.modules(), buffers[0].modules()):
                mine.__class__ = type(theirs)
                for chosen in ("kernel_rows", "fused_rows"):
                    if hasattr(theirs, chosen):
                        setattr(mine, chosen, getattr(theirs, chosen))
        for j in range(len(blocks)):
            self.bind(j, j % len(buffers))  # on the device from the start: model.dtype_device() reads layer 0

    def bind(self, j: int, slot: int):
        self.pointers[j](self.buffer_tensors[slot])

    def release(self, j: int):
        pass  # the ring hands the buffer on


class CopiedLayers(Buffers):
    """The CPU, where the file's tensors need a cast, an alignment or a repacking (int4) before they run:
    each layer copied from the mapped file into a buffer, the next layer's pages asked for ahead, and each
    tensor's pages dropped from this process once copied."""

    def __init__(self, mapped: MappedFile, blocks: list, names: list, buffers: list):
        super().__init__(blocks, buffers)
        self.mapped, self.names = mapped, names
        self.tensors = [{n: mapped.tensor(full) for n, full in layer.items()} for layer in names]

    def fill(self, slot: int, j: int):
        self.mapped.advise(self.names[(j + 1) % len(self.names)].values(), mmap.MADV_WILLNEED)
        tensors = self.buffer_tensors[slot]
        for name, t in self.tensors[j].items():
            tensors[name].copy_(t)
            self.mapped.advise([self.names[j][name]], mmap.MADV_DONTNEED)
        qlinear.prepare(self.buffers[slot])


class PinnedLayers(Buffers):
    """A GPU: the streamed layers' tensors read into pinned CPU memory (which a GPU copies from
    asynchronously), floating-point ones in the dtypes they run in (dtypes, by name), so that only the
    bytes the device uses cross the bus; each copied into a buffer on the copier's stream."""

    def __init__(self, weights_path: str, blocks: list, names: list, buffers: list, dtypes: dict):
        super().__init__(blocks, buffers)
        self.tensors = []
        with WeightsFile(weights_path) as f:
            for layer in names:
                self.tensors.append({})
                for name, full in layer.items():
                    t = f.get_tensor(full)
                    self.tensors[-1][name] = (t.to(dtypes[name]) if t.is_floating_point() else t).pin_memory()

    def fill(self, slot: int, j: int):
        tensors = self.buffer_tensors[slot]
        for name, t in self.tensors[j].items():
            tensors[name].copy_(t, non_blocking=True)
        qlinear.prepare(self.buffers[slot])


# ---------------------------------------------------------------------------------------------------------
# The stream


class LayerStream:
    """Streams the weights of `blocks` at every forward pass from `source` (MappedLayers, CopiedLayers or
    PinnedLayers), source.slots layers at a time, with `copier`."""

    def __init__(self, blocks: list, source, copier, resident_layers: int):
        self.blocks, self.source, self.copier, self.resident_layers = blocks, source, copier, resident_layers
        self.queue = deque()  # (block, slot, fill done) in the order the blocks will run
        self.running = None   # the slot of the block computing
        self.bytes_per_pass = sum(tensor_bytes(t.values()) for t in source.tensors)
        self.bytes_moved = 0
        for j, block in enumerate(blocks):
            block.register_forward_pre_hook(partial(self.before, j))
            block.register_forward_hook(partial(self.after, j))

    def start_fill(self, j: int, slot: int):
        self.queue.append((j, slot, self.copier.submit(partial(self.source.fill, slot, j))))
        self.bytes_moved += tensor_bytes(self.source.tensors[j].values())

    def before(self, j: int, block, args):
        if not self.queue or self.queue[0][0] != j:  # the first pass, or the last one stopped midway
            while self.queue:
                self.copier.wait(self.queue.popleft()[2])
            for k in range(self.source.slots):
                self.start_fill((j + k) % len(self.blocks), k)
        _, slot, done = self.queue.popleft()
        self.copier.wait(done)
        self.source.bind(j, slot)
        self.running = slot

    def after(self, j: int, block, args, output):
        # The slot just used goes to the block `slots` further on, in the order of the next pass.
        self.source.release(j)
        self.start_fill((j + self.source.slots) % len(self.blocks), self.running)

    def stats(self) -> dict:
        return {"resident_layers": self.resident_layers, "streamed_layers": len(self.blocks),
                "prefetch": self.source.slots - 1, "zero_copy": isinstance(self.source, MappedLayers),
                "bytes_per_pass": self.bytes_per_pass, "bytes_moved": self.bytes_moved,
                "copy_seconds": self.copier.copy_seconds()}


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_offloaded(checkpoint_dir: str, device, dtype: torch.dtype, options: OffloadOptions) -> Transformer:
    """The model with its first layers resident and the others streamed (model.offload, a LayerStream), or
    wholly resident when everything fits. On a GPU, options.gpu_layers are resident; on the CPU, as many as
    options.max_resident_gb allows beside the layers in flight."""
    device = torch.device(device)
    if device.type == "cuda":
        if options.max_resident_gb is not None:
            raise UsageError("--max-resident-gb budgets CPU memory; on a GPU give --gpu-layers N (or --offload)")
    elif device.type == "cpu":
        if options.max_resident_gb is None:
            raise UsageError("--offload and --gpu-layers stream layers to a GPU; on the CPU give --max-resident-gb G")
    else:
        raise UsageError(f"offloading runs on cuda or cpu, not {device.type}")
    args, quantization = read_config(checkpoint_dir)
    weights_path = f"{checkpoint_dir}/model.safetensors"
    # the floats in dtype (the quantized layers' scales in float32), as load_model's
    template = qlinear.cast_floats(build_on_meta(replace(args, n_layers=1), quantization).layers[0], dtype)
    kinds = tensors_of(template)
    stored = list(template.state_dict())  # the tensors a layer has in the file

    def new_buffer() -> nn.Module:  # a block's modules on the device, with what qlinear.prepare adds
        block = copy.deepcopy(template).to_empty(device=device)
        qlinear.prepare(block)
        return block.requires_grad_(False)

    def names(i: int) -> dict:  # a layer's tensors: name in the block -> name in the file
        return {n: f"layers.{i}.{n}" for n in stored}

    try:
        if device.type == "cuda":
            zero_copy = False
        else:
            mapped = MappedFile(weights_path)
            # In place when every tensor is stored as it runs: no cast, no repacking (int4's kernel layout is
            # made at load, as int8's is where qkernels.cpp packs it), integers aligned for the int8 kernel.
            repacked = (bool(quantization) and quantization["mode"].startswith("int4")) or any(
                isinstance(m, qlinear.Int8Linear) and m.packs_weight() for m in template.modules())
            zero_copy = not repacked and all(
                mapped.dtype(full) == kinds[n].dtype
                and (kinds[n].is_floating_point() or mapped.span(full)[0] % 64 == 0)
                for i in range(args.n_layers) for n, full in names(i).items())
        buffers = [] if zero_copy else [new_buffer()]  # a buffer holds what qlinear.prepare adds, too
        if device.type == "cuda":
            resident = min(options.gpu_layers, args.n_layers)
        else:
            in_flight = tensor_bytes(tensors_of(buffers[0]).values()) if buffers else tensor_bytes(kinds.values())
            resident = resident_within(options, args.n_layers, in_flight,
                                       0 if zero_copy else max(mapped.span(f"layers.0.{n}")[1] for n in stored))
        model = load_model(checkpoint_dir, device=device, dtype=dtype, resident_layers=resident)
        if resident == args.n_layers:
            return model
        streamed = list(range(resident, args.n_layers))
        slots = min(options.prefetch + 1, len(streamed))
        blocks, layer_names = [model.layers[i] for i in streamed], [names(i) for i in streamed]
        if zero_copy:
            source, copier = MappedLayers(mapped, blocks, layer_names, slots), ThreadCopier()
        else:
            buffers += [new_buffer() for _ in range(slots - 1)]
            if device.type == "cuda":
                dtypes = {n: kinds[n].dtype for n in stored}
                source, copier = PinnedLayers(weights_path, blocks, layer_names, buffers, dtypes), StreamCopier(device)
            else:
                source, copier = CopiedLayers(mapped, blocks, layer_names, buffers), ThreadCopier()
    except FileNotFoundError:
        raise UsageError(f"{weights_path}: missing")
    except KeyError as e:
        raise UsageError(f"{weights_path}: tensor {e} is missing")
    except (OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"{weights_path}: truncated or corrupt ({e})")
    for i, layer in zip(streamed, source.tensors):
        for name, t in layer.items():
            if t.shape != kinds[name].shape:
                raise UsageError(f"{weights_path}: tensor layers.{i}.{name} has shape {tuple(t.shape)}, "
                                 f"config.json implies {tuple(kinds[name].shape)}")
    model.offload = LayerStream(blocks, source, copier, resident)
    return model


def resident_within(options: OffloadOptions, n_layers: int, layer_bytes: int, copying: int) -> int:
    """How many layers max_resident_gb holds beside the prefetch + 1 layers in flight (and, when they are
    copied, the one tensor whose file pages are mapped while it is copied: `copying` bytes)."""
    budget = options.max_resident_gb * 1e9
    if budget >= n_layers * layer_bytes:
        return n_layers
    ring = min(options.prefetch + 1, n_layers) * layer_bytes + copying
    if budget < ring:
        raise UsageError(f"--max-resident-gb {options.max_resident_gb:g} is less than streaming needs: "
                         f"{options.prefetch + 1} layers in flight (--prefetch {options.prefetch}) take "
                         f"{ring / 1e9:.3f} GB")
    return min(int((budget - ring) // layer_bytes), n_layers - 1)
