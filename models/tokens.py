"""Prompts -> token ids, the one way: padded to the tokenizer's max length, as the text encoder was trained to see
them (training batches, caches, the empty prompt of classifier-free guidance, sampling)."""
from __future__ import annotations

from typing import Any, Sequence

import torch


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """[B, L] int64 token ids of `prompts`."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(torch.int64)
