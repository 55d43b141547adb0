"""A LLaMA-family transformer with a static KV cache, in plain PyTorch.

Covers Llama 1/2/3, Mistral, Qwen2 (q/k/v biases), SmolLM and TinyLlama: RoPE (with Llama 3.1 and
linear scaling), RMSNorm, SwiGLU, and multi-, grouped- and multi-query attention.

Usage:
    model = Transformer(ModelArgs.from_dict(json.load(open("config.json"))))
    model.setup_caches(max_batch_size=1, max_seq_length=2048)
    logits = model(tokens, input_pos)      # tokens [B, S], input_pos [S] -> logits [B, S, vocab]

Two KV caches: the static one above (one row of max_seq_length slots per batch row), and a paged one for
serving many sequences (PagedAttention): one pool of fixed-size blocks per layer, each sequence's
K/V in the blocks its block table lists, each row at its own positions:
    model.setup_paged_cache(num_blocks=512, block_size=16)
    logits = model.forward_paged(tokens, positions, write_slots, read_slots)   # -> [B, vocab], last tokens

RoPE is applied in the "rotate half" layout that Hugging Face checkpoints use: the first half of each
head's dimensions are the real parts, the second half the imaginary parts. Checkpoints laid out with
interleaved pairs (Meta's originals, GGUF, llama2.c) are permuted once at conversion time.

A Transformer may also be one stage of a pipeline: a contiguous range of the layers, with the embedding
only in the first stage (set tok_embeddings to None in the others) and the final norm and output head only
in the last (norm and output None): a stage takes tokens or hidden states and returns hidden states or
logits, and first_row places its batch in rows of the static cache, one range of rows per micro-batch.

This file imports only torch and may be copied on its own.
"""
import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    norm_eps: float
    rope_base: float
    max_seq_len: int
    tie_embeddings: bool
    attention_bias: bool  # biases on the q/k/v projections (Qwen2)
    # None, {"type": "linear", "factor": f}, or {"type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_seq_len"}
    rope_scaling: Optional[dict] = None

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        """Build from a config.json dictionary; every field but rope_scaling must be present."""
        names = {f.name for f in fields(cls)}
        missing = [n for n in names if n not in d and n != "rope_scaling"]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(sorted(missing))}")
        args = cls(**{k: v for k, v in d.items() if k in names})
        args.validate()
        return args

    def validate(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size",
                     "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"field {name} must be a positive integer, not {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.rope_scaling is not None and self.rope_scaling.get("type") not in ("linear", "llama3"):
            raise ValueError(f"unsupported rope_scaling {self.rope_scaling!r}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 (as the reference implementations do), scale in the model's dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def rope_frequencies(args: ModelArgs) -> Tensor:
    """The inverse frequency of each rotated pair of dimensions, with any context-extension scaling."""
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq.float()
    if scaling["type"] == "linear":
        return (inv_freq / scaling["factor"]).float()
    # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_seq_len"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen) - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, blended)
    out = torch.where(wavelen < old_len / high, inv_freq, out)
    return out.float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, S, H, D]; cos, sin [B, S, 1, D/2]. Rotates (x[:D/2], x[D/2:]) pairs."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class KVCache(nn.Module):
    def __init__(self, batch_size: int, max_seq_length: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, index, k: Tensor, v: Tensor):
        """Write k, v [B, H_kv, S, D] at positions input_pos [S] of rows first_row .. first_row + B - 1
        (index = (input_pos, first_row)); return the caches of those rows."""
        # index_copy_ writes in place without a host sync, so the step stays one static graph.
        input_pos, first_row = index
        B = k.shape[0]
        k_cache, v_cache = self.k_cache.narrow(0, first_row, B), self.v_cache.narrow(0, first_row, B)
        k_cache.index_copy_(2, input_pos, k)
        v_cache.index_copy_(2, input_pos, v)
        return k_cache, v_cache


class PagedKVCache(nn.Module):
    """K/V of many sequences in one pool of slots, num_blocks * block_size of them. A sequence's token at
    position p lives in slot block_table[p // block_size] * block_size + p % block_size."""

    def __init__(self, num_slots: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (num_slots, n_kv_heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots, k: Tensor, v: Tensor):
        """Write k, v [B, H_kv, S, D] into the slots write [B, S]; return the K/V of the slots read [B, L]
        as [B, H_kv, L, D]: row b's positions 0..L-1."""
        write, read = slots
        B, H, S, D = k.shape
        self.k_cache.index_copy_(0, write.reshape(-1), k.transpose(1, 2).reshape(B * S, H, D))
        self.v_cache.index_copy_(0, write.reshape(-1), v.transpose(1, 2).reshape(B * S, H, D))
        return self.k_cache[read].transpose(1, 2), self.v_cache[read].transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        # One matrix for q, k and v: the input is read once instead of three times.
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=args.attention_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache = None  # a KVCache or a PagedKVCache

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache_index) -> Tensor:
        """cache_index says where the new K/V go and what to attend to: (input_pos [S], first row) for a
        KVCache, (write slots [B, S], read slots [B, L]) for a PagedKVCache. mask [B or 1, 1, n_rep * S or 1,
        L]: one row for each of the stacked query rows below (row r: position r % S), or one for all."""
        B, S, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(B, S, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(B, S, self.n_kv_heads, self.head_dim), cos, sin)
        v = v.view(B, S, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = self.kv_cache.update(cache_index, k, v)
        # Attend to the slots the mask covers: the filled part of the cache (rounded up), not all of it.
        k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]
        # Grouped-query attention without copying K/V: the n_rep query heads that share a key/value
        # head are stacked along the sequence axis, so each K/V head is read once, as it is stored.
        n_rep = self.n_heads // self.n_kv_heads
        q = q.reshape(B, self.n_kv_heads, n_rep * S, self.head_dim)
        # (mask: already for these rows, Transformer.layers_forward)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.reshape(B, self.n_heads, S, self.head_dim).transpose(1, 2).reshape(B, S, q_size)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.intermediate_size = args.intermediate_size
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.intermediate_size, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, mask, cache_index):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache_index)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = self.max_seq_length = 0

    def dtype_device(self):
        """The activations' dtype and the device: a norm's (weights may be quantized integers)."""
        norm = self.layers[0].attention_norm.weight
        return norm.dtype, norm.device

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        """Allocate the KV caches and RoPE tables; call again to resize (the caches are cleared)."""
        dtype, device = self.dtype_device()
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        # One slot more than can be used: the attended part of the cache is then never all of it, so a step
        # compiled with a symbolic attended length needs no second graph for "all of it" (a contiguous view).
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_length + 1, self.args.n_kv_heads,
                                               self.args.head_dim, dtype, device)
        self.setup_rope(max_seq_length)

    def setup_paged_cache(self, num_blocks: int, block_size: int):
        """Allocate a paged KV cache of num_blocks blocks of block_size slots per layer (replacing any
        cache), and RoPE tables for the model's whole context."""
        dtype, device = self.dtype_device()
        for layer in self.layers:
            layer.attention.kv_cache = PagedKVCache(num_blocks * block_size, self.args.n_kv_heads,
                                                    self.args.head_dim, dtype, device)
        self.max_batch_size = self.max_seq_length = 0  # the static cache is gone
        self.setup_rope(self.args.max_seq_len)

    def setup_rope(self, length: int):
        angles = torch.outer(torch.arange(length, dtype=torch.float32), rope_frequencies(self.args))
        device = self.dtype_device()[1]
        self.register_buffer("rope_cos", angles.cos().to(device), persistent=False)
        self.register_buffer("rope_sin", angles.sin().to(device), persistent=False)

    def forward(self, tokens: Tensor, input_pos: Tensor, left_pad: Optional[Tensor] = None,
                kv_len: Optional[int] = None, last_only: bool = False, first_row: int = 0) -> Tensor:
        """tokens [B, S] at cache positions input_pos [S] -> logits [B, S, vocab] ([B, 1, vocab] of the last
        position with last_only, all that sampling needs: the output head is the largest product).
        A pipeline stage after the first takes hidden states [B, S, dim] for tokens; one before the last
        returns hidden states [B, S, dim] (all positions). The batch uses cache rows from first_row on.

        left_pad [B] (optional) is the number of padding tokens at the start of each row: those cache
        slots are never attended to, and each row's RoPE positions start at 0 after its padding, so a
        left-padded row computes exactly what it computes alone.

        kv_len (optional) limits attention to the first kv_len cache slots, which must include every
        position written so far: a decode step then reads the filled part of the cache, not all of it.
        """
        assert self.max_seq_length, "call setup_caches() first"
        B = tokens.shape[0]
        slots = torch.arange(kv_len or self.max_seq_length, device=tokens.device)
        mask = slots[None, None, :] <= input_pos[None, :, None]  # causal: [1, S, L]
        positions = input_pos[None, :].expand(B, -1)
        if left_pad is not None:
            # Padding is never attended to. A padding slot attends to itself only: a row with nothing to
            # attend to comes out as 0 or NaN depending on the SDPA backend, and NaN in a padding slot's
            # K/V would spread to every row through attention weights of 0.
            own = slots[None, None, :] == input_pos[None, :, None]
            mask = mask & ((slots[None, None, :] >= left_pad[:, None, None]) | own)
            positions = (positions - left_pad[:, None]).clamp(min=0)
        x = self.layers_forward(tokens, positions, mask.unsqueeze(1), (input_pos, first_row))
        if self.output is None:
            return x
        return self.output(self.norm(x[:, -1:] if last_only else x))

    def forward_paged(self, tokens: Tensor, positions: Tensor, write_slots: Tensor, read_slots: Tensor) -> Tensor:
        """tokens [B, S] at their own positions [B, S] -> logits [B, vocab] of each row's last token, over
        the paged cache (setup_paged_cache).

        write_slots [B, S]: where each token's K/V go. read_slots [B, L]: row b's slots for positions
        0..L-1 (from its block table); a query at position p attends to positions 0..p. L may run past a
        row's text (any slot will do there: the mask hides it). Padding rows of a batch can write to and
        read from a scratch slot at position 0.
        """
        L = read_slots.shape[1]
        mask = torch.arange(L, device=tokens.device)[None, None, :] <= positions[:, :, None]  # [B, S, L]
        x = self.layers_forward(tokens, positions, mask.unsqueeze(1), (write_slots, read_slots))
        if self.output is None:  # a pipeline stage before the last: hidden states [B, S, dim]
            return x
        return self.output(self.norm(x[:, -1]))

    def layers_forward(self, tokens, positions, mask, cache_index) -> Tensor:
        """Embedding and every block: tokens [B, S] (or hidden states [B, S, dim]) at positions [B, S], mask
        [B or 1, 1, S, L] -> [B, S, dim]."""
        # Attention stacks the query heads that share a key/value head as rows: their mask is made here,
        # once, not in every layer (in a compiled step each layer's copy cost several percent of its time:
        # BENCHMARKS.md). One position's mask row serves all of them as it is.
        n_rep = self.args.n_heads // self.args.n_kv_heads
        if n_rep > 1 and mask.shape[2] > 1:
            mask = mask.repeat(1, 1, n_rep, 1)
        cos = self.rope_cos[positions].unsqueeze(2)
        sin = self.rope_sin[positions].unsqueeze(2)
        x = tokens if tokens.is_floating_point() else self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache_index)
        return x
