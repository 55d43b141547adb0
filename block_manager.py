"""The paged KV cache's bookkeeping (PagedAttention): which block of the pool holds which positions of
which sequence, reference counts, and the prefix cache.

Blocks are allocated as a sequence grows and given back when it ends. A block that is full of computed
tokens is registered under the hash of the whole prefix up to its end, so a later sequence that begins
with the same tokens (a system prompt, an earlier turn of the chat) takes the block as it is instead of
recomputing it: its reference count counts the sequences that use it. A freed block keeps its contents
and its hash until it is needed for something else, least recently freed first. A shared block is never
written: a sequence that would write into one gets a private copy first (copy on write).
"""
import hashlib
from collections import OrderedDict

from sequence import Sequence


def prefix_hash(parent: bytes, tokens) -> bytes:
    """The hash of a prefix ending with `tokens`, chained on the hash of what comes before them."""
    return hashlib.sha256(parent + b"".join(t.to_bytes(4, "little") for t in tokens)).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_count = [0] * num_blocks
        self.block_hash = [None] * num_blocks      # the prefix hash a full block is registered under
        self.block_tokens = [None] * num_blocks    # its tokens, checked on every hit
        self.cached = {}                           # prefix hash -> block id
        self.free = OrderedDict.fromkeys(range(num_blocks))  # ref count 0, least recently freed first

    @property
    def num_free(self) -> int:
        return len(self.free)

    def _take(self, block: int):
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def _allocate(self) -> int:
        block, _ = self.free.popitem(last=False)
        if self.block_hash[block] is not None:  # evict its cached contents
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = self.block_tokens[block] = None
        self.ref_count[block] = 1
        return block

    def admit(self, seq: Sequence) -> int:
        """Give a sequence without blocks the cached blocks of its longest cached prefix, in whole blocks;
        returns how many of its tokens they hold. At least its last token is left to compute, since its
        logits are what the sequence needs next."""
        assert not seq.block_table
        parent, bs = b"", self.block_size
        for start in range(0, len(seq.tokens) - bs + 1, bs):
            tokens = seq.tokens[start:start + bs]
            h = prefix_hash(parent, tokens)
            block = self.cached.get(h)
            if block is None or self.block_tokens[block] != tokens:
                break
            self._take(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        hit = len(seq.block_table) * bs
        seq.num_computed = min(hit, len(seq.tokens) - 1)
        return hit

    def reserve(self, seq: Sequence, n: int):
        """Make the next n positions of seq writable: blocks allocated for them, and a private copy of a
        shared block among them. Returns the (source, copy) block pairs whose contents must be copied
        before the step, or None, changing nothing, when the pool has too few free blocks."""
        bs, first, end = self.block_size, seq.num_computed, seq.num_computed + n
        shared = [i for i in range(first // bs, min(len(seq.block_table), -(-end // bs)))
                  if self.ref_count[seq.block_table[i]] > 1 or self.block_hash[seq.block_table[i]] is not None]
        new = max(0, -(-end // bs) - len(seq.block_table))
        if len(shared) + new > self.num_free:
            return None
        copies = []
        for i in shared:
            old = seq.block_table[i]
            seq.block_table[i] = self._allocate()
            self._release(old)
            copies.append((old, seq.block_table[i]))
            del seq.block_hashes[i:]  # this block and any after it will be rewritten, then registered again
        for _ in range(new):
            seq.block_table.append(self._allocate())
        return copies

    def fork(self, parent: Sequence, child: Sequence):
        """Give child (a new beam of a beam search) parent's blocks, shared: whichever of them writes into a
        shared block later gets a copy first (reserve)."""
        for block in parent.block_table:
            self._take(block)
        child.block_table, child.block_hashes = list(parent.block_table), list(parent.block_hashes)
        child.num_computed = parent.num_computed

    def register(self, seq: Sequence):
        """Enter the full, computed blocks of seq that are not registered yet into the prefix cache."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            tokens = seq.tokens[i * bs:(i + 1) * bs]
            h = prefix_hash(seq.block_hashes[-1] if seq.block_hashes else b"", tokens)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached and self.block_hash[block] is None:
                self.cached[h] = block
                self.block_hash[block], self.block_tokens[block] = h, tokens

    def _release(self, block: int):
        self.ref_count[block] -= 1
        assert self.ref_count[block] >= 0, f"block {block} freed twice"
        if self.ref_count[block] == 0:
            self.free[block] = None

    def release(self, seq: Sequence):
        """Give back all of seq's blocks; the last ones first, so that a prefix outlives its tails."""
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table, seq.block_hashes, seq.num_computed = [], [], 0
