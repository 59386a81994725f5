"""The non-finite guard: a step whose loss or gradients are NaN/Inf on any rank is skipped on every rank.

Why it is built this way (and not by returning None from `training_step`): under DDP, FSDP and DeepSpeed every rank
must run the same backward, or the gradient all-reduce hangs, and Lightning refuses a None loss whenever
world_size > 1. So a rejected micro-batch still runs backward, through its own graph, on a loss of exactly zero
(`skip_loss`), and the optimizer step is then dropped inside the optimizer itself: a step pre-hook takes every
gradient away (`drop_gradients`), so the optimizer leaves each parameter and its state untouched. That hook sits on
the optimizer the strategy finally steps: the plain one, the one a GradScaler steps, and the base optimizer under
DeepSpeed's ZeRO wrapper (where it sees the fp32 partitions' gradients). The decision is reduced across ranks before
it is taken, so all ranks skip together; the step counter, LR schedule, EMA and data position advance as for any
step, exactly as on one process.

Gradients are checked where the strategy keeps them: on the parameters (single device, DDP, FSDP's local shards,
then reduced); under DeepSpeed the engine itself drops a step whose global (all-reduced) gradient norm is not
finite, and `step_applied` reads its verdict. fp16 is left to its loss scaler, which skips such steps by design.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Raised after too many consecutive non-finite steps; the last good checkpoint is left untouched."""


def skip_loss(per_sample: torch.Tensor) -> torch.Tensor:
    """A loss of exactly zero through the same graph as `per_sample`, so every rank's backward (and its gradient
    reduction) runs as usual. `nan_to_num`'s gradient is zero where its input is not finite, so the NaN never
    reaches the gradients through the loss itself; the step is dropped in any case."""
    if per_sample.grad_fn is None:
        raise RuntimeError("the method's loss has no autograd graph: a skipped step still runs backward on every "
                           "rank (DDP/DeepSpeed), so a method must return its NaN loss from the model's outputs "
                           "(e.g. loss * nan), not a new tensor")
    return per_sample.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0


def drop_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Take every gradient the optimizer would apply: torch's optimizers (and lion, prodigy, schedule-free, 8-bit,
    DeepSpeed's CPU Adam) skip parameters without one, so the step changes neither weights nor moments."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def gradients_finite(params: list[torch.nn.Parameter]) -> torch.Tensor | None:
    """Whether this rank's gradients are all finite, as a 0-d bool tensor on their device (one fused reduction, no
    host read: the caller reads it with the loss's flag); None when it holds none."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())


class StepGuard:
    """Counts skipped optimizer steps and stops the run after `limit` in a row.

    `reject(reason)` marks the optimizer step in progress as skipped (the first reason is kept); `install` and
    `wrap_closure` drop its gradients before the optimizer applies them; `finish()` closes the step: it counts it,
    resets the streak on a good step and raises `NonFiniteError` at the limit.
    """

    def __init__(self, limit: int, on_skip: Callable[[str, int], None] | None = None):
        self.limit = int(limit)
        self.streak = 0
        self.total = 0
        self.reason: str | None = None
        self.on_skip = on_skip
        self._loss_ok: torch.Tensor | None = None

    def note_loss(self, finite: torch.Tensor) -> None:
        """A micro-batch's loss flag (a 0-d bool tensor, not read yet): an optimizer step's micro-batches are ANDed."""
        self._loss_ok = finite if self._loss_ok is None else self._loss_ok & finite

    def take_loss_flag(self, device: torch.device) -> torch.Tensor:
        """The step's loss flag (True when no micro-batch noted one), reset for the next step."""
        flag, self._loss_ok = self._loss_ok, None
        return flag.to(device) if flag is not None else torch.ones((), dtype=torch.bool, device=device)

    def reject(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def drop_if_rejected(self, optimizer: torch.optim.Optimizer) -> None:
        if self.reason is not None:
            drop_gradients(optimizer)

    def install(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop a rejected step when the optimizer is stepped after its gradients exist: DeepSpeed's ZeRO wrapper
        steps its base optimizer over the fp32 partitions, a GradScaler steps it after unscaling. (An optimizer
        stepped with the closure inside sees its gradients only after this hook: `wrap_closure` covers that.)"""
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.drop_if_rejected(opt))

    def wrap_closure(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any]) -> Callable[[], Any]:
        """The training closure (forward and backward), then a rejected step's gradients dropped."""
        def run() -> Any:
            result = closure()
            self.drop_if_rejected(optimizer)
            return result
        return run

    def finish(self, step: int, rejected_by_strategy: bool = False) -> str | None:
        """Close the optimizer step `step`; returns why it was skipped, or None when it was applied."""
        reason = self.reason or ("gradient" if rejected_by_strategy else None)
        self.reason, self._loss_ok = None, None
        if reason is None:
            self.streak = 0
            return None
        self.streak += 1
        self.total += 1
        log.warning("non-finite %s at step %d: step skipped (%d in a row, %d in total)", reason, step, self.streak,
                    self.total)
        if self.on_skip is not None:
            self.on_skip(reason, self.total)
        if self.streak >= self.limit:
            raise NonFiniteError(
                f"training stopped: {self.streak} consecutive non-finite steps (last: {reason}) at step {step}"
                f" (limit module.max_nonfinite_steps={self.limit}); the last good checkpoint is kept."
                " Lower the learning rate or use bf16/fp32 precision.")
        return reason
