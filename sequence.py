"""One request inside the engine: its tokens, how many of them the KV cache holds, and its blocks."""
from enum import Enum
from typing import Optional

import torch

from sampling import SamplingParams


class Status(Enum):
    WAITING = "waiting"      # not admitted yet, or preempted (its cache freed; recomputed when readmitted)
    RUNNING = "running"      # has blocks; prefilling or decoding
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt: list, params: SamplingParams, device: torch.device):
        self.request_id, self.params = request_id, params
        self.tokens = list(prompt)            # the prompt, then every token generated so far
        self.num_prompt_tokens = len(prompt)
        self.num_computed = 0                 # tokens[:num_computed] have their K/V in the cache
        self.num_cached_prompt_tokens = 0     # prompt tokens found in the prefix cache at first admission
        self.block_table: list = []           # block ids holding positions 0, block_size, 2 * block_size, ...
        self.block_hashes: list = []          # the prefix hash of each full block, as far as computed
        self.status = Status.WAITING
        self.finish_reason: Optional[str] = None
        self.admitted_once = False
        self.width = 1                        # batch rows it will take: num_beams for a beam search's prompt
        # A seed gives this request its own generator: its tokens do not depend on what else runs.
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to be fed to the model before the next one can be sampled (1 when decoding)."""
        return len(self.tokens) - self.num_computed
