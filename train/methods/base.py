"""What a training method is: a loss over the one loop, never a loop of its own."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from train.module import DiffusionModule


class Method:
    """A method supplies `loss(batch, module) -> {"loss": [B], ...per-sample metrics}`.

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
