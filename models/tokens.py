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


class ChatTokenizer:
    """A chat LLM as text encoder (Z-Image's Qwen3): each prompt becomes one user turn of the tokenizer's chat
    template (with the assistant turn opened), padded to `model_max_length`, as the family's pipeline does."""

    def __init__(self, tokenizer: Any, **template: Any):
        self.parts, self.template = (tokenizer,), template

    @property
    def model_max_length(self) -> int:
        return int(self.parts[0].model_max_length)

    @property
    def pad_token_id(self) -> int:
        return int(self.parts[0].pad_token_id)

    def tokenize_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.parts[0]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                         **self.template) for p in prompts]
        return tokenize(tok, texts)


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """[B, L] int64 token ids of `prompts`."""
    if hasattr(tokenizer, "tokenize_prompts"):  # several tokenizers, or a chat template (models/families/)
        return tokenizer.tokenize_prompts(prompts)
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(torch.int64)


def row_keys(input_ids: torch.Tensor) -> list[bytes]:
    """One hashable key per row of token ids (the text cache's, train/text_cache.py); made on the host, in the
    loader's collate, so that the training step never reads ids back from a device."""
    return [row.tobytes() for row in input_ids.detach().to("cpu", torch.int64).numpy()]
