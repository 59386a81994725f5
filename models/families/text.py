"""What the LLM text encoders of the newer families share (Z-Image and Flux.2: Qwen3; Qwen-Image: Qwen2.5-VL):
right-padded ids whose attention mask is "not the pad token", as their tokenizers' own masks are."""
from __future__ import annotations

import torch


class LLMTextEncoder(torch.nn.Module):
    """A chat LLM behind the one text-encoder call (`module(ids)[0]` -> context); subclasses pick its hidden states."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int):
        super().__init__()
        self.text_encoder, self.pad_token_id = model, int(pad_token_id)

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    def hidden_states(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(attention mask, every layer's hidden states) of right-padded ids."""
        mask = input_ids != self.pad_token_id
        out = self.text_encoder(input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=True,
                                use_cache=False)
        return mask, out.hidden_states
