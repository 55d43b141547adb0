"""The linear layers that loading puts in place of nn.Linear: quantized ones, the int4 storage format, and
float ones for the CPU's few-row products.

- Int8Linear: symmetric int8, one scale per output channel: w = q * scale, q in [-127, 127].
- Int4Linear: asymmetric int4, one scale and zero point per group of `groupsize` inputs:
  w = (q - 8) * scale + zero, q in [0, 15], stored two to a byte (even input index in the low nibble).
- FloatLinear: nn.Linear on the CPU, with float32 weights, or bfloat16 or float16 ones where the CPU has no
  products for them (AVX2): our own product up to FLOAT_KERNEL_ROWS rows, float32's for more.

Which kernel runs:
- On a CPU with AVX2, int8 and int4 alike: our own products of qkernels.cpp, built for the machine at load
  (cpu_kernels), which round the input to int8 per block of 32 and multiply in integers (llama.cpp's
  Q8_0 x Q8_0 and Q4_1 x Q8_0). PyTorch has no int4 x int8 product on the CPU, and its other quantized
  ones ran at a half to a tenth of the memory's speed for a decode step's rows (BENCHMARKS.md). Where the
  CPU has neither AVX-512 nor VNNI, prepare() packs int8 weights for them in place (pack_int8_for_kernel:
  eight output channels interleaved, each weight plus 128, so that the products need no sign operations
  or transposes), and their input rounds to 7 bits (-63..63) instead of 8. Where the CPU has AVX-512 VNNI
  and BF16, ours run up to KERNEL_MAX_ROWS rows (a batch, a speculative verify step), and longer prompts
  take the paths below.
- int8 on the CPU, for more rows (a prompt), or where the kernels cannot be built: int8 activations too
  (W8A8). Each product rounds its input to uint8 per row and multiplies in integers (`torch._int_mm`);
  quantize.py smooths the weights so that this rounding costs little. A compiled step of such rows freezes
  the weights (decode.frozen_settings) and the same integer product runs on a copy of the weight packed at
  compile time, autotuned between Inductor's own u8 x s8 kernel and oneDNN's (packed_int_mm). A checkpoint
  quantized before smoothing runs weight-only, as int4 does.
- int4 on the CPU, for more rows or without our kernels: PyTorch's fused weight-only kernel
  (`_weight_int4pack_mm_for_cpu`) up to INT4_FUSED_MAX_ROWS rows (compiled, autotuned against Inductor's
  own int4 kernel: decode.frozen_settings); for a prompt of many rows, the weight dequantized and the float
  matmul.
- int4 on a CUDA GPU (compute capability 8.0 and up): PyTorch's fused weight-only kernel
  (`_weight_int4pack_mm`, tinygemm) up to CUDA_INT4_FUSED_MAX_ROWS rows, on a copy of the weight packed
  for it at load (the stored one stays, for prompts: twice the int4 weights' memory); more rows dequantize
  the weight and use the float matmul.
- Other devices, and int8 on a CUDA GPU: the weight dequantized and the float matmul (weight-only). On an
  H200 that int8 product took longer than bfloat16's, as did Inductor's fusion of the conversion into a
  multiply-and-sum (BENCHMARKS.md): int8 saves memory there, not time.
quantize.py writes the quantized layers' tensors; checkpoint.py builds the layers, loads them and calls
prepare(), which also makes float layers FloatLinear where it runs them.
"""
import ctypes
import functools
import hashlib
import os
import platform
import sys
import threading
from typing import Optional

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn as nn
import torch.nn.functional as F

# The fused weight-only CPU kernels are made for decoding: their time grows with every row, so beyond these
# many rows dequantizing the weight once and using the float matmul is faster (crossovers in BENCHMARKS.md).
INT8_FUSED_MAX_ROWS = 16
INT4_FUSED_MAX_ROWS = 128
# qkernels.cpp's products read each weight block once for all of a step's rows, but their integer work grows
# with every row: on CPUs with AVX-512 VNNI and BF16, where PyTorch's int8 and bfloat16 matrix products have
# instructions of their own, ours run up to these many rows and PyTorch's take longer prompts. Without
# them, PyTorch's were 5x (bfloat16) to 25x (int8) slower than ours for a 512-row prompt, and ours run all.
KERNEL_MAX_ROWS = 8
# FloatLinear's kernel reads the weight once for all rows, but its float32 multiply-adds grow with every row:
# near 64 rows it and PyTorch's float32 product took as long, for bfloat16 weights (converted) and float32
# ones alike; at 32 rows, PyTorch's took twice as long for bfloat16, 1.15-1.35x for float32 (BENCHMARKS.md).
FLOAT_KERNEL_ROWS = 32
# The fused weight-only CPU kernels are far slower in float32 than in bfloat16, so they run in bfloat16
# whatever the model's dtype; the rounding of the layer's input and output is well below the quantized
# weights' error.
KERNEL_DTYPE = torch.bfloat16
# PyTorch's int4 kernel for CUDA reads the packed weight once for all rows, but its work grows with the
# rows: on an H200 it took about as long for 1 to 64 rows of a 2048 x 8192 product, and 3.5 times that for
# 256 (BENCHMARKS.md). Beyond these many rows, the dequantized weight and cuBLAS's product take over; where
# between 64 and 256 rows that starts to pay has not been measured.
CUDA_INT4_FUSED_MAX_ROWS = 64
# How far ahead in a weight qkernels.cpp's products ask the memory for, in bytes, by CPU vendor: what measured
# best on the Intel Xeon (Ice Lake) and the AMD EPYCs these were tuned on (BENCHMARKS.md); others take AMD's.
PREFETCH_BYTES = {"GenuineIntel": 8192}
PREFETCH_BYTES_DEFAULT = 2048
# How much farther one row's products also ask for lines into the second-level cache, by CPU vendor and
# family, 0 for not at all: on an AMD EPYC Zen 2 (family 23) batch-1 steps took 2-6% less time with it, on a
# Zen 3 (family 25) 1-10% more (BENCHMARKS.md); the others keep what they had, unmeasured.
PREFETCH_FARTHER_BYTES = {("AuthenticAMD", "25"): 0}
PREFETCH_FARTHER_BYTES_DEFAULT = 8192


class Int8Linear(nn.Module):
    FLOAT32 = ("scales",)  # kept in float32 whatever the model's dtype (cast_floats)

    def __init__(self, in_features, out_features, bias=False, device=None, int8_activations=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # False for a checkpoint quantized before quantize.py smoothed int8 weights: rounding its activations
        # to 8 bits costs several times more, so it runs weight-only
        self.int8_activations = int8_activations
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        # each output channel's sum of its int8 weights, made by prepare() on the CPU: the activations' zero
        # point times it is what their offset adds to each output
        self.register_buffer("weight_sums", None, persistent=False)
        # scale 1 and zero point 0 per output channel, for packed_int_mm (made by prepare())
        self.register_buffer("unit_scales", None, persistent=False)
        self.register_buffer("zero_points", None, persistent=False)
        # Where this layer sees a slice of each input row (a row-parallel layer under tensor parallelism),
        # a function that widens each row's (min, max) to the whole row's, so that every rank rounds the
        # row as one process would (tp.py sets it). qkernels.cpp needs none: its blocks of 32 inputs lie
        # within one rank's slice.
        self.row_range = None
        self.kernel_rows = 0  # up to how many rows qkernels.cpp runs this layer (set by prepare())
        # where qkernels.cpp's build packs int8 weights (q8_packs_weights), the weight's own memory in that
        # layout (pack_int8_for_kernel), made by prepare()
        self.register_buffer("kernel_weight", None, persistent=False)

    def prepare(self):
        """On the CPU, up to how many rows qkernels.cpp runs this layer, and the weight sums that
        int8_activation_matmul needs; into the buffer when it exists (offload.py refills a layer's buffers
        at every step). Where qkernels.cpp packs int8 weights, the weight is packed in place, in its own
        memory, and kernel_weight is that memory in the packed layout: the stored layout is gone, so call
        this once for each time the weight is filled."""
        if self.weight.device.type != "cpu":
            return
        self.kernel_rows = cpu_kernels() if self.in_features % 32 == 0 else 0
        if self.int8_activations:
            sums = self.weight.sum(dim=1, dtype=torch.int32)  # an integer: exact, and no cast alters it
            if self.weight_sums is None:
                self.weight_sums = sums
                self.unit_scales = torch.ones(self.out_features)
                self.zero_points = torch.zeros(self.out_features, dtype=torch.int32)
            else:
                self.weight_sums.copy_(sums)
        if self.packs_weight():
            packed = pack_int8_for_kernel(self.weight)
            self.kernel_weight = self.weight.view(torch.uint8).view(packed.shape)
            self.kernel_weight.copy_(packed)

    def packs_weight(self) -> bool:
        """Whether prepare() packs this layer's weight in place for qkernels.cpp on the CPU (for any device's
        module: offload.py asks of a template on the meta device). The kernel packs eight output channels at
        once; where it packs, every row runs on it."""
        return bool(cpu_kernels()) and self.in_features % 32 == 0 and self.out_features % 8 == 0 and q8_packs_weights()

    def forward(self, x):
        if x[..., 0].numel() <= self.kernel_rows:
            # (.float(): a no-op unless the module was cast since)
            weight = self.weight if self.kernel_weight is None else self.kernel_weight
            y = cpu_kernel(torch.ops.nimblelm.q8_linear, x, weight, self.scales.float())
        elif self.weight_sums is not None:
            y = int8_activation_matmul(x.reshape(-1, self.in_features), self.weight, self.weight_sums, self.scales,
                                       self.row_range, (self.unit_scales, self.zero_points))
            y = y.reshape(*x.shape[:-1], -1).to(x.dtype)
        elif x.device.type == "cpu" and x[..., 0].numel() <= INT8_FUSED_MAX_ROWS:  # an unsmoothed checkpoint
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(KERNEL_DTYPE), self.weight,
                                                   self.scales.to(KERNEL_DTYPE))
            y = y.reshape(*x.shape[:-1], -1).to(x.dtype)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y + self.bias if self.bias is not None else y


def int8_activation_matmul(x, weight, weight_sums, scales, row_range=None, unit=None):
    """x [M, K] float @ weight [N, K] int8, times scales [N] -> [M, N] float32, with x quantized to uint8
    per row: x ~ lo + step * q, q in 0..255. The product then is step * (q @ weight.T) + lo * weight_sums
    (weight_sums [N] int32: each output's sum of its weights), its integer part one `torch._int_mm`
    (oneDNN's u8 x s8 kernel, VNNI where the CPU has it, exact int32 sums), or in a frozen graph
    packed_int_mm with unit (the layer's scales of 1 and zero points of 0). Compiled, the quantizing fuses
    into the kernel that makes x (the norm before q/k/v, which share one product, as do gate and up) and
    the rescaling into the kernel that uses the result."""
    x = x.float()
    lo, hi = x.aminmax(dim=-1, keepdim=True)
    if row_range is not None:
        lo, hi = row_range(lo, hi)
    step = ((hi - lo) / 255).clamp(min=1e-12)
    q = ((x - lo) / step).round().clamp(0, 255).to(torch.uint8)
    if frozen_graph() and unit is not None:
        acc = packed_int_mm(q, weight, *unit)
    else:
        # weight.t() as it is stored: oneDNN reads each output's row of K bytes, faster than a transposed copy
        acc = torch._int_mm(q, weight.t()).float()  # [M, N]
    return (acc * step + lo * weight_sums) * scales


def frozen_graph() -> bool:
    """Whether torch.compile is tracing with Inductor's freezing on (decode.frozen_settings says when):
    the weights then become constants that Inductor may transform at compile time."""
    return torch.compiler.is_compiling() and torch._inductor.config.freezing


def packed_int_mm(q, weight, unit_scales, zero_points):
    """q [M, K] uint8 @ weight [N, K] int8 -> the int32 sums [M, N] as float32, written as the pattern of
    dequantize-and-multiply ops (scales [N] of 1, zero points [N] of 0) that Inductor's freezing turns into
    a u8 x s8 product over a copy of the weight packed once, at compile time: oneDNN's, and with
    max_autotune also Inductor's own kernel, the faster one chosen per shape (decode.frozen_settings).
    Inductor offers its kernel only where the zero points are a constant of the graph, which it checks
    are zero: so they are the layer's tensors, not made here. The sums are _int_mm's, converted to
    float32 as acc.float() converts them. Only for frozen graphs: elsewhere these ops would run as a
    float matmul of the dequantized weight."""
    qd = torch.ops.quantized_decomposed
    return F.linear(qd.dequantize_per_tensor(q, 1.0, 0, 0, 255, torch.uint8),
                    qd.dequantize_per_channel(weight, unit_scales, zero_points, 0, -128, 127, torch.int8))


class Int4Linear(nn.Module):
    FLOAT32 = ("scales_and_zeros",)  # kept in float32 whatever the model's dtype (cast_floats)

    def __init__(self, in_features, out_features, bias=False, groupsize=32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        # [in / groupsize, out, 2]: (scale, zero) per group, the layout PyTorch's int4 kernels take
        self.register_buffer("scales_and_zeros", torch.empty(in_features // groupsize, out_features, 2,
                                                             dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        # PyTorch's kernel's layout and scales (its CPU or its CUDA kernel), made by prepare()
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("kernel_scales_and_zeros", None, persistent=False)
        # qkernels.cpp's copy of the layer, made by prepare(): its values, and a float16 scale and offset
        # (zero - 8 * scale) per block of 32 inputs, eight output channels interleaved (pack_int4_for_kernel)
        self.register_buffer("kernel_weight", None, persistent=False)
        self.fused_rows = 0  # up to how many rows PyTorch's kernel runs this layer (set by prepare())
        self.kernel_rows = 0  # up to how many rows qkernels.cpp runs this layer

    def prepare(self):
        """Repack for the device's kernels, once the weights are loaded where they will run; into the
        repacked buffers when they exist (offload.py refills a layer's buffers at every step)."""
        if self.weight.device.type == "cuda":
            inner_k_tiles = cuda_int4_tiles(self)
            if inner_k_tiles:
                # tinygemm's packing takes the even input of each byte in the high nibble; ours is in the low
                packed = torch.ops.aten._convert_weight_to_int4pack((self.weight << 4) | (self.weight >> 4),
                                                                    inner_k_tiles)
                self.fused_rows = CUDA_INT4_FUSED_MAX_ROWS
                self.fill_packed(packed, self.scales_and_zeros.to(KERNEL_DTYPE))
            return
        if self.weight.device.type != "cpu":
            return
        self.kernel_rows = cpu_kernels() if self.groupsize % 32 == 0 else 0
        if self.kernel_rows:
            scale, zero = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # [out, groups] each
            scale, offset = (t.repeat_interleave(self.groupsize // 32, dim=1) for t in (scale, zero - 8 * scale))
            kernel_weight = pack_int4_for_kernel(self.weight, scale, offset)
            if self.kernel_weight is None:
                self.kernel_weight = kernel_weight
            else:
                self.kernel_weight.copy_(kernel_weight)
        if self.kernel_rows == float("inf") or self.out_features % 16:  # (its blocks are of 16 channels)
            return  # PyTorch's kernel would never run, or cannot
        self.fused_rows = INT4_FUSED_MAX_ROWS
        # Kept in the kernel's dtype: converting the float32 scales at every step would re-read them.
        self.fill_packed(pack_int4_for_cpu(self.weight), self.scales_and_zeros.to(KERNEL_DTYPE))

    def fill_packed(self, packed, scales_and_zeros):
        if self.packed is None:
            self.packed, self.kernel_scales_and_zeros = packed, scales_and_zeros
        else:
            self.packed.copy_(packed)
            self.kernel_scales_and_zeros.copy_(scales_and_zeros)

    def forward(self, x):
        rows = x[..., 0].numel()
        if rows <= self.kernel_rows:
            y = cpu_kernel(torch.ops.nimblelm.q4_linear, x, self.kernel_weight, self.out_features)
        elif self.packed is not None and rows <= self.fused_rows:
            mm = (torch.ops.aten._weight_int4pack_mm if self.packed.device.type == "cuda"
                  else torch.ops.aten._weight_int4pack_mm_for_cpu)
            y = mm(x.reshape(-1, self.in_features).to(KERNEL_DTYPE), self.packed, self.groupsize,
                   self.kernel_scales_and_zeros.to(KERNEL_DTYPE))  # a no-op unless the module was cast since
            y = y.reshape(*x.shape[:-1], -1).to(x.dtype)
        else:
            y = F.linear(x, dequantize_int4(self.weight, self.scales_and_zeros, self.groupsize, x.dtype))
        return y + self.bias if self.bias is not None else y


def cuda_int4_tiles(layer: Int4Linear) -> int:
    """The innerKTiles that PyTorch's CUDA int4 kernel (tinygemm) packs this layer's weight with, or 0
    where that kernel cannot run it: it needs compute capability 8.0, groups of 32 to 256 inputs, output
    channels in eights and inputs in tiles of 16 x innerKTiles (2, 4 or 8: the most that divides them).
    Not on ROCm, whose build of it we have not run."""
    device = layer.weight.device
    if (torch.version.hip or torch.cuda.get_device_capability(device) < (8, 0)
            or layer.groupsize not in (32, 64, 128, 256) or layer.out_features % 8):
        return 0
    return next((t for t in (8, 4, 2) if layer.in_features % (16 * t) == 0), 0)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out, in / 2] bytes -> [out, in] values 0..15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values 0..15 -> [out, in / 2] bytes."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def pack_int4_for_kernel(packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Our [out, in / 2] bytes, with a scale and an offset per block of 32 inputs ([out, in / 32] each), in
    the layout of qkernels.cpp's q4_linear (described at the top of that file): [ceil(out / 8), in / 32, 160]
    bytes, eight output channels interleaved, zeros past the last. qkernels.cpp's q4_pack makes it in one
    pass: streamed layers (offload.py) are repacked at every step."""
    return torch.ops.nimblelm.q4_pack(packed, scales.half().contiguous(), offsets.half().contiguous())


def pack_int8_for_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Our [out, in] int8 weight (out a multiple of 8) in the layout of qkernels.cpp's q8_packed:
    [out / 8, in / 32, 256] bytes; for each eight output channels and block of 32 inputs, eight vectors of
    32 bytes, vector j holding for channel r its inputs 4j..4j + 3, each weight plus 128."""
    n, k = weight.shape
    blocks = weight.view(n // 8, 8, k // 32, 8, 4).permute(0, 2, 3, 1, 4)  # [out / 8, in / 32, j, channel, 4]
    return (blocks.contiguous().view(torch.uint8) ^ 0x80).view(n // 8, k // 32, 256)


def pack_int4_for_cpu(packed: torch.Tensor) -> torch.Tensor:
    """Our [out, in / 2] bytes in the layout of `_weight_int4pack_mm_for_cpu`.

    PyTorch's own converter takes the values as int32, four bytes each, and is slow enough to dominate a
    load, or a streamed layer (offload.py). Its layout, on machines with AVX-512, pairs output channel
    n + 32 (high nibble) with n (low) for each input, in blocks of 64 channels: a shuffle of our bytes,
    done here on half-size tensors. The shuffle is checked against the converter once; where they differ
    (another CPU, another PyTorch), the converter is used."""
    if packed.shape[0] % 64 == 0 and _cpu_layout_is_shuffle():
        return _shuffle_for_cpu(packed)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).to(torch.int32), 1)


def _shuffle_for_cpu(packed: torch.Tensor) -> torch.Tensor:
    n = packed.shape[0]
    b = packed.view(n // 64, 2, 32, -1)  # [blocks, low / high half, 32 channels, in / 2]
    low, high = b[:, 0], b[:, 1]
    even, odd = (low & 0xF) | (high << 4), (low >> 4) | (high & 0xF0)  # inputs 2i and 2i + 1
    return torch.stack([even, odd], dim=-1).permute(0, 2, 3, 1).contiguous().view(n, -1)  # [blocks, in, 32]


@functools.cache
def _cpu_layout_is_shuffle() -> bool:
    probe = torch.randint(0, 256, (128, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(probe).to(torch.int32), 1)
    return reference.shape == probe.shape and torch.equal(reference, _shuffle_for_cpu(probe))


def dequantize_int4(packed, scales_and_zeros, groupsize, dtype=torch.float32):
    """[out, in / 2] bytes -> [out, in] weights in dtype. This runs for every product of a long prompt, so
    it makes few passes: each nibble goes straight into its place in the output, scaled and offset in the
    output's dtype by its group's values, broadcast rather than repeated to full size."""
    out_features = packed.shape[0]
    scale, zero = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # [out, groups] each
    offset = (zero - 8 * scale).to(dtype)[..., None]
    scale = scale.to(dtype)[..., None]
    p = packed.view(out_features, -1, groupsize // 2)  # [out, groups, groupsize / 2]
    if torch.compiler.is_compiling():  # Dynamo takes no out= views; Inductor makes this one pass anyway
        q = torch.stack([p & 0xF, p >> 4], dim=-1).to(dtype)  # [..., even / odd input]
        return (q * scale[..., None] + offset[..., None]).view(out_features, -1)
    w = torch.empty(*p.shape, 2, dtype=dtype, device=packed.device)  # [..., even / odd input]
    torch.addcmul(offset, (p & 0xF).to(dtype), scale, out=w[..., 0])
    torch.addcmul(offset, (p >> 4).to(dtype), scale, out=w[..., 1])
    return w.view(out_features, -1)


class FloatLinear(nn.Linear):
    """nn.Linear on the CPU whose products of a few rows (a decode step, a batch, a verify step) run
    qkernels.cpp's float_linear, which reads the weight once for all rows and splits it among the threads:
    for float32 weights, and for bfloat16 or float16 ones on a CPU without instructions for their products
    (prepare() puts it in place of nn.Linear there: see runs()). PyTorch's float32 products of such rows
    gained little from a second thread, at about half the memory's speed for one row and a fifth for 2 to
    8, and those of bfloat16 or float16 weights without instructions ran at the same few GFLOP/s at any
    number of rows, a sixth of float32's for a prompt (BENCHMARKS.md). More rows than FLOAT_KERNEL_ROWS (a
    prompt), or a weight cast since to a dtype the kernel does not take, multiply in float32, the weight
    converted once per product. Both sum in float32, as PyTorch's do, and the output is rounded to the
    input's dtype."""

    # the CPU flag that gives each half dtype products of its own (measured without them: AVX2 only)
    NEEDS = {torch.bfloat16: "avx512_bf16", torch.float16: "avx512_fp16"}
    DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what float_linear takes

    @classmethod
    def runs(cls, weight: torch.Tensor) -> bool:
        """Whether this layer should run a weight: on the CPU, float32, or of a dtype the CPU has no products
        for."""
        if weight.device.type != "cpu" or weight.dtype not in cls.DTYPES or not cpu_kernels():
            return False
        return weight.dtype == torch.float32 or cls.NEEDS[weight.dtype] not in cpu_features()

    def forward(self, x):
        if self.weight.device.type != "cpu":  # moved since prepare(): nn.Linear's own product there
            return super().forward(x)
        if x[..., 0].numel() <= FLOAT_KERNEL_ROWS and self.weight.dtype in self.DTYPES:
            y = cpu_kernel(torch.ops.nimblelm.float_linear, x, self.weight)
        else:
            y = F.linear(x.float(), self.weight.float()).to(x.dtype)
        return y + self.bias if self.bias is not None else y


def cpu_kernel(op, x: torch.Tensor, *args) -> torch.Tensor:
    """One of qkernels.cpp's products (cpu_kernels) over x [..., K]: x's rows as the contiguous float32
    [rows, K] it takes, its float32 [rows, N] back in x's shape and dtype."""
    y = op(x.reshape(-1, x.shape[-1]).float().contiguous(), *args)
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def replace_linears(model: nn.Module, quantization: dict):
    """Swap every nn.Linear of the model (built on the meta device) for its quantized counterpart."""
    mode, groupsize = quantization["mode"], quantization.get("groupsize")
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                if mode == "int8":
                    new = Int8Linear(child.in_features, child.out_features, child.bias is not None, device="meta",
                                     int8_activations="smoothing" in quantization)
                else:
                    new = Int4Linear(child.in_features, child.out_features, child.bias is not None, groupsize,
                                     device="meta")
                setattr(module, child_name, new)


def cast_floats(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """module.to(dtype), in place, but with the quantized layers' scales (int4's with their zero points) in
    float32, as quantize.py writes them: the dtypes load_model and offload.py's streamed layers load them in.
    Rounded to bfloat16 they moved each output channel's weights by up to 0.4% (int4's were then rounded
    again, to the kernel's float16), and a compiled int8 step converted them back to the kernels' float32
    at every step."""
    kept = [(m, name, getattr(m, name)) for m in module.modules() for name in getattr(m, "FLOAT32", ())]
    module.to(dtype)
    for m, name, t in kept:  # from the tensors as they were: not rounded to dtype on the way
        setattr(m, name, t.float())
    return module


@functools.cache
def cpu_kernels() -> float:
    """Build qkernels.cpp (kernel_library) and register its ops as torch.ops.nimblelm (q8_linear, q4_linear,
    float_linear; q4_pack; few_query_attention, for decode.few_query_attention_pass; argmax, for
    sampling.argmax), once a process; return up to how many rows the products should run (KERNEL_MAX_ROWS,
    or all). 0 where it cannot be built: the layers then use PyTorch's kernels."""
    if not kernel_library():
        return 0

    @torch.library.register_fake("nimblelm::q8_linear")
    def _(x, weight, scales):  # (weight as stored, or packed: scales has one per output)
        return x.new_empty(x.shape[0], scales.shape[0])

    @torch.library.register_fake("nimblelm::q4_linear")
    def _(x, weight, n):
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("nimblelm::float_linear")
    def _(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("nimblelm::few_query_attention")
    def _(query, key, value, attn_mask, scale):
        return torch.empty_like(query, memory_format=torch.contiguous_format)

    @torch.library.register_fake("nimblelm::argmax")
    def _(x):
        return x.new_empty(x.shape[0], dtype=torch.long)
    return KERNEL_MAX_ROWS if {"avx512_vnni", "avx512_bf16"} <= cpu_features() else float("inf")


@functools.cache
def kernel_library() -> Optional[ctypes.CDLL]:
    """qkernels.cpp built for this machine's CPU and loaded, its symbols global (so that compiled steps link
    to its C entry points, C_SHIMS, as they load); None, with one line on stderr, where it cannot be built
    (not x86, no C++ compiler, no AVX2). The build is kept in torch's extensions folder
    (~/.cache/torch_extensions) under a name that holds a digest of the CPU's features and the build's
    flags, so a machine builds it once, and a home shared by machines of different CPUs never runs one
    CPU's build on another."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    features = cpu_features()
    farther = PREFETCH_FARTHER_BYTES.get((cpu_vendor(), cpuinfo("cpu family")), PREFETCH_FARTHER_BYTES_DEFAULT)
    flags = ["-O3", "-march=native", "-fopenmp",
             f"-DPREFETCH_BYTES={PREFETCH_BYTES.get(cpu_vendor(), PREFETCH_BYTES_DEFAULT)}",
             f"-DPREFETCH_FARTHER_BYTES={farther}"]
    name = "nimblelm_qkernels_" + hashlib.sha256(" ".join(sorted(features) + flags).encode()).hexdigest()[:16]
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qkernels.cpp")
    # a build (once a machine and version) takes about half a minute, silent; a load of the kept one, a moment
    building = threading.Timer(3.0, print, ["nimblelm: building qkernels.cpp for this CPU (once: it is kept)"],
                               {"file": sys.stderr, "flush": True})
    building.daemon = True
    building.start()
    try:
        from torch.utils import cpp_extension
        path = cpp_extension.load(name, [source], extra_cflags=flags, is_python_module=False)
        # (a PyDLL's functions keep the GIL: KernelTeam's callback into Python need not wait for it)
        library = ctypes.PyDLL(path, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
    except Exception as e:  # the compiler's own report is long; its first line says which step failed
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"nimblelm: qkernels.cpp could not be built ({reason}); the linear layers use PyTorch's kernels",
              file=sys.stderr)
        return None
    finally:
        building.cancel()
    # the team's entry points (KernelTeam)
    library.nimblelm_team_new.restype = ctypes.c_void_p
    library.nimblelm_q8_packs_weights.restype = ctypes.c_int
    library.nimblelm_team_free.argtypes = [ctypes.c_void_p]
    library.nimblelm_team_run.argtypes = [ctypes.c_void_p, _TEAM_CALLBACK, ctypes.py_object]
    return library


def q8_packs_weights() -> bool:
    """Whether qkernels.cpp's int8 product takes its weights packed on this machine
    (pack_int8_for_kernel): where the CPU has neither AVX-512 nor VNNI."""
    library = kernel_library()
    return bool(library and library.nimblelm_q8_packs_weights())


class KernelTeam:
    """PyTorch's threads held for the whole of a call (run), for qkernels.cpp's products and attention
    inside it: between the products, the threads other than the caller's read ahead the weights they will
    read next, while the caller runs the rest of the step (qkernels.cpp, Team). For the compiled steps of
    decode.ExportedStep, whose calls are all in C++. What the team learns (which weight follows which) is
    kept on this object, so make one per compiled graph: it reads only the weights that graph reads."""

    def __init__(self):
        self.library = kernel_library()
        self.memory = self.library.nimblelm_team_new()

    def run(self, fn, *args):
        """fn(*args) with the team."""
        call = [fn, args, None, None]  # and its result, or what it raised
        self.library.nimblelm_team_run(self.memory, _team_callback, call)
        if call[3] is not None:
            raise call[3]
        return call[2]

    def __del__(self):
        if getattr(self, "memory", None):
            self.library.nimblelm_team_free(self.memory)


def _run_call(call: list) -> int:
    """KernelTeam.run's call, from the C++ that holds the team; what it raises is raised again by run."""
    fn, args = call[0], call[1]
    try:
        call[2] = fn(*args)
    except BaseException as e:
        call[3] = e
    return 0


_TEAM_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.py_object)
_team_callback = _TEAM_CALLBACK(_run_call)


# qkernels.cpp's C entry points, one per op, which the libraries of decode.ExportedStep call directly rather
# than through PyTorch's proxy executor (Inductor's custom_ops_to_c_shims: decode.compiled_package)
C_SHIMS = {
    "q8_linear": "AOTITorchError aoti_torch_cpu_q8_linear(AtenTensorHandle x, AtenTensorHandle weight, "
                 "AtenTensorHandle scales, AtenTensorHandle* ret0)",
    "q4_linear": "AOTITorchError aoti_torch_cpu_q4_linear(AtenTensorHandle x, AtenTensorHandle weight, int64_t N, "
                 "AtenTensorHandle* ret0)",
    "float_linear": "AOTITorchError aoti_torch_cpu_float_linear(AtenTensorHandle x, AtenTensorHandle weight, "
                    "AtenTensorHandle* ret0)",
    "few_query_attention": "AOTITorchError aoti_torch_cpu_few_query_attention(AtenTensorHandle query, "
                           "AtenTensorHandle key, AtenTensorHandle value, AtenTensorHandle* attn_mask, double scale, "
                           "AtenTensorHandle* ret0)",
    "argmax": "AOTITorchError aoti_torch_cpu_argmax(AtenTensorHandle x, AtenTensorHandle* ret0)",
}


@functools.cache
def cpuinfo(field: str) -> Optional[str]:
    """The first value of `field` in Linux's /proc/cpuinfo ("" where no line has it), or None where that
    cannot be read (another system)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[-1].strip() for line in f if line.startswith(field)), "")
    except OSError:
        return None


@functools.cache
def cpu_features() -> frozenset:
    """The CPU's instruction-set flags as Linux names them (avx2, avx512_vnni, ...); on other systems,
    the words of platform.processor()."""
    flags = cpuinfo("flags")
    return frozenset((platform.processor() if flags is None else flags).split())


def cpu_vendor() -> str:
    """The CPU's vendor as Linux names it (GenuineIntel, AuthenticAMD), or "" where that cannot be read."""
    return cpuinfo("vendor_id") or ""


def prepare(model: nn.Module):
    """Give every quantized layer what its kernels need on the device its weights are on: which rows our
    CPU kernels run, int4's scales for them and repacked weights for PyTorch's, int8's weight sums; and
    make float linear layers FloatLinear where it runs their weights (a change of class: same tensors)."""
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            m.prepare()
        elif type(m) is nn.Linear and FloatLinear.runs(m.weight):
            m.__class__ = FloatLinear
