"""Prompts -> token ids, the one way: padded to the tokenizer's max length, as the text encoder was trained to see
them (training batches, caches, the empty prompt of classifier-free guidance, sampling)."""
from __future__ import annotations

from typing import Any, Sequence

import torch


class JointTokenizer:
    """Several tokenizers reading the same prompt (Flux: CLIP for the pooled vector, T5 for the context): their padded
    ids side by side, `[B, L1 + L2 + ...]`; the family's text-encoder module splits them by `lengths`."""

    def __init__(self, *tokenizers: Any):
        self.parts = tokenizers

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(int(t.model_max_length) for t in self.parts)

    @property
    def model_max_length(self) -> int:
        return sum(self.lengths)

    def tokenize_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.cat([tokenize(t, prompts) for t in self.parts], dim=1)


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """[B, L] int64 token ids of `prompts`."""
    if isinstance(tokenizer, JointTokenizer):
        return tokenizer.tokenize_prompts(prompts)
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(torch.int64)
