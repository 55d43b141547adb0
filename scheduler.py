"""Iteration-level scheduling (Orca): which sequences run in the next step, and how many tokens each.

Every step decodes all running sequences that are past their prompt, one token each, and spends what is
left of a per-step token budget on prompts, in chunks, so that a long prompt never stalls the running
decodes. New requests join at any step, as blocks and the sequence limit allow. When the pool runs out
of blocks, the most recently admitted sequence is preempted: its blocks are freed and it waits at the
head of the queue, to be recomputed, prompt and generated tokens alike, when there is room again.
"""
from collections import deque
from dataclasses import dataclass, field

from block_manager import BlockManager
from sequence import Sequence, Status


@dataclass
class Plan:
    """One step's work: (sequence, tokens to compute) pairs, and (source, copy) blocks to copy first."""
    work: list = field(default_factory=list)
    copies: list = field(default_factory=list)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks, self.max_num_seqs, self.token_budget = blocks, max_num_seqs, max_num_batched_tokens
        self.waiting: deque = deque()
        self.running: list = []        # in order of admission
        self.preemptions = 0
        self.prefix_cache_hit_tokens = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def remove(self, seq: Sequence):
        """Take a sequence out (finished or aborted) and give back its blocks."""
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def preempt(self, seq: Sequence):
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def schedule(self) -> Plan:
        plan, budget = Plan(), self.token_budget
        # 1. Running sequences, oldest first, each given room for its tokens; on need the newest is
        # preempted (never one already planned, as those are older). Prompts leave a token per decode.
        decodes_left = sum(s.num_uncomputed == 1 for s in self.running)
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue
            decoding = seq.num_uncomputed == 1
            decodes_left -= decoding
            n = min(seq.num_uncomputed, budget - (0 if decoding else decodes_left))
            if n <= 0:
                continue
            while (copies := self.blocks.reserve(seq, n)) is None:
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                plan.work.append((seq, n))
                plan.copies += copies
                budget -= n
        # 2. Waiting sequences join while there is room: rows, budget, and blocks for their chunk.
        rows = sum(s.width for s in self.running)
        while self.waiting and budget > 0 and rows + self.waiting[0].width <= self.max_num_seqs:
            seq = self.waiting[0]
            hit = self.blocks.admit(seq)
            n = min(seq.num_uncomputed, budget)
            copies = self.blocks.reserve(seq, n)
            if copies is None:
                self.blocks.release(seq)
                break
            self.waiting.popleft()
            self.running.append(seq)
            rows += seq.width
            seq.status = Status.RUNNING
            self.prefix_cache_hit_tokens += seq.num_computed
            if not seq.admitted_once:
                seq.admitted_once, seq.num_cached_prompt_tokens = True, min(hit, seq.num_computed)
            plan.work.append((seq, n))
            plan.copies += copies
            budget -= n
        return plan

    def replace(self, old: list, new: list):
        """Put the sequences new in the place of old (a beam search's beams, after a step): new ones
        run, old ones end."""
        at = min((self.running.index(s) for s in old if s in self.running), default=len(self.running))
        self.running[at:at] = new
        for seq in new:
            seq.status = Status.RUNNING
        for seq in old:
            self.remove(seq)

    def computed(self, seq: Sequence, n: int):
        """After the step: n more tokens of seq are in the cache."""
        seq.num_computed += n
        self.blocks.register(seq)
