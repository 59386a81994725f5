"""The frozen reference a method compares with or learns from (DPO, SPIN, erasure, distillation teachers).

A context, not a copy, where an adapter exists: `with module.reference() as ref:` switches the adapter off. Otherwise
(or for an opponent that must follow the trained weights, SPIN) a frozen copy made before the first step, held outside
every engine so no strategy shards or checkpoints it. Mixed into DiffusionModule, which holds `unet`,
`text_encoder` and `_reference_copy`.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Iterator

import torch

from models.adapters import adapters_disabled, has_peft_adapter
from train.strategies import full_parameters


@dataclass
class Reference:
    """The frozen base model, as `with module.reference() as ref:` hands it to a method (no gradients)."""
    unet: torch.nn.Module
    text_encoder: torch.nn.Module

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]


class FrozenReference:
    """`require_reference`, `reference()`, `refresh_reference` and the reference's state, for DiffusionModule."""

    def require_reference(self, copy_weights: bool = False) -> None:
        """Called by a method's `setup` when it needs the frozen base. With an adapter, the base is the same weights
        with the adapter switched off (no copy); otherwise, or with `copy_weights` (an opponent that must follow the
        trained weights, SPIN), a frozen copy is made now, before any training step, outside every engine."""
        if self._reference_copy or (self.has_adapter and not copy_weights):
            return
        self._reference_copy["unet"] = copy.deepcopy(self.unet).requires_grad_(False).eval()
        trains_text = any(p.requires_grad for p in self.text_encoder.parameters())
        self._reference_copy["text_encoder"] = (copy.deepcopy(self.text_encoder).requires_grad_(False).eval()
                                                if trains_text else self.text_encoder)

    def refresh_reference(self) -> None:
        """The frozen copy becomes the current weights (SPIN: the opponent is the previous iterate)."""
        for name in ("unet", "text_encoder"):
            ref, live = self._reference_copy.get(name), getattr(self, name)
            if ref is not None and ref is not live:
                with full_parameters(self, list(live.parameters())):  # whole tensors under ZeRO-3/FSDP
                    ref.load_state_dict(live.state_dict())

    def reference_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self._reference_copy["unet"].state_dict().items()}

    def load_reference_state(self, state: dict[str, torch.Tensor]) -> None:
        self._reference_copy["unet"].load_state_dict(state)

    @property
    def has_adapter(self) -> bool:
        return has_peft_adapter(self.unet) or has_peft_adapter(self.text_encoder)

    @contextlib.contextmanager
    def reference(self) -> Iterator[Reference]:
        """The frozen base for the block: `with module.reference() as ref: ref.unet(...)`."""
        if self._reference_copy:
            for name, model in self._reference_copy.items():
                if next(model.parameters()).device != self.device:
                    self._reference_copy[name] = model.to(self.device)
            with torch.no_grad():
                yield Reference(self._reference_copy["unet"], self._reference_copy["text_encoder"])
        elif self.has_adapter:
            with adapters_disabled(self.unet, self.text_encoder), torch.no_grad():
                yield Reference(self.unet, self.text_encoder)
        else:
            raise RuntimeError("module.reference(): the method must call module.require_reference() in its setup")
