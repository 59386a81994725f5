"""What a training method is: a loss over the one loop, never a loop of its own."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from train.module import DiffusionModule


# What a method sees of the module: the trained denoiser and its parts, batch conversions, the frozen reference, the
# training forwards' hooks and a few services. Never the LightningModule or the Trainer: the module hands every hook a
# `MethodView`, which refuses any other member, so a method keeps working whatever strategy or loop runs it.
METHOD_INTERFACE = frozenset({
    # the denoiser and its parts
    "unet", "text_encoder", "vae", "components", "core", "device", "noise_generator", "global_step", "method_name",
    "has_adapter",
    # batches in model space
    "batch_x0", "batch_context", "encode_images", "encode_text", "empty_prompt_ids", "decode",
    # the frozen reference / teacher (train/module.py: a context, or a frozen copy outside every engine)
    "require_reference", "reference", "refresh_reference", "reference_state", "load_reference_state",
    # around a training forward
    "patch_masking", "alignment", "kept_patches",
    # services
    "world_size", "gather", "accumulate_grad_batches", "register_trainable",
})


class MethodView:
    """The module as a method sees it: the members of `METHOD_INTERFACE`, nothing else."""

    __slots__ = ("_module",)

    def __init__(self, module: "DiffusionModule"):
        object.__setattr__(self, "_module", module)

    def __getattr__(self, name: str) -> Any:
        if name not in METHOD_INTERFACE:
            raise AttributeError(f"a method sees the module through train/methods/base.py's METHOD_INTERFACE; "
                                 f"'{name}' is not part of it")
        return getattr(object.__getattribute__(self, "_module"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a method cannot set '{name}' on the module; keep its state on the method "
                             "(or register a trained network with register_trainable)")


class Method:
    """A method supplies `loss(batch, module) -> {"loss": [B], ...per-sample metrics}`; `module` is a `MethodView`.

    `setup(module)` builds what the method needs beside the trained network (a frozen reference, a teacher,
    a reward), kept outside the sharded engine unless trained. The module reduces the `[B]` loss, guards
    against non-finite values and logs; a method never calls backward or steps an optimizer.
    """

    name = "method"
    objectives: tuple[str, ...] = ("epsilon", "v_prediction")  # the model objectives its loss is written for
    objective_hint = ""  # how to get a model with one of them, for the refusal message

    def setup(self, module: "DiffusionModule") -> None:  # noqa: B027 - optional hook
        pass

    def loss(self, batch: dict[str, Any], module: "DiffusionModule") -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def on_step_end(self, module: "DiffusionModule") -> None:  # noqa: B027 - optional hook
        """After each optimizer step (not each micro-batch): target-network updates, opponent refreshes."""

    def state_dict(self, module: "DiffusionModule") -> dict[str, Any]:
        """Method state that must survive a resume (iteration counters, opponents, buffers); in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any], module: "DiffusionModule") -> None:  # noqa: B027
        pass


class RefreshedReference(Method):
    """A method whose frozen reference becomes the trained weights now and then (SPIN's opponent each iteration,
    progressive distillation's teacher each round). Its state: the counter and, once it moved, the reference's weights,
    so a resumed run goes on against the same reference."""

    counter = "round"              # the attribute (and state key) that counts refreshes
    reference_key = "reference"    # the state key of the reference's weights

    def state_dict(self, module) -> dict[str, Any]:
        n = int(getattr(self, self.counter))
        state: dict[str, Any] = {self.counter: n}
        if n > 0:
            state[self.reference_key] = module.reference_state()
        return state

    def load_state_dict(self, state: dict[str, Any], module) -> None:
        setattr(self, self.counter, int(state.get(self.counter, 0)))
        if self.reference_key in state:
            module.load_reference_state(state[self.reference_key])

