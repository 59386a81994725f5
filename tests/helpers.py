"""Test-only callbacks, loaded by the real CLI through Hydra overrides (`+callbacks.x._target_=tests.helpers.X`)."""
import json
import socket

import lightning as L


def free_port() -> int:
    """A free TCP port on loopback (for a process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RecordKeys(L.Callback):
    """Appends, per training batch, the step, epoch, batch index and sample keys to a JSONL file."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch, "batch_idx": batch_idx,
                                "keys": batch["keys"]}) + "\n")


class InjectNonFinite(L.Callback):
    """Makes the loss (or one trained parameter's gradient) NaN at chosen optimizer steps on chosen ranks, and
    appends after every step this rank's skip count and a digest of the whole trained weights (gathered under
    ZeRO-3/FSDP) to `<path>.rank<R>.jsonl`: what a diverging run looks like to the loop, under a real strategy.

    `loss_at` / `grad_at`: "STEP:RANK" entries (RANK `*` for every rank), STEP the 0-based optimizer step."""

    def __init__(self, path: str, loss_at=(), grad_at=()):
        self.path, self.loss_at, self.grad_at = path, self._parse(loss_at), self._parse(grad_at)
        self._handle = None

    @staticmethod
    def _parse(entries) -> set[tuple[int, str]]:
        return {(int(step), rank) for step, rank in (str(e).split(":") for e in entries)}

    @staticmethod
    def _hit(trainer, at) -> bool:
        return bool({(trainer.global_step, "*"), (trainer.global_step, str(trainer.global_rank))} & at)

    def setup(self, trainer, module, stage) -> None:
        loss = module.method.loss

        def poisoned(batch, mod):
            out = loss(batch, mod)
            # added, not multiplied: the gradients stay exact zeros, which an optimizer would still apply (momentum,
            # weight decay), so only the guard's skip keeps the weights
            return {**out, "loss": out["loss"] + float("nan")} if self._hit(trainer, self.loss_at) else out

        module.method.loss = poisoned

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self._hit(trainer, self.grad_at):
            param = next(p for p in module.parameters() if p.requires_grad)
            self._handle = param.register_hook(lambda g: g * float("nan"))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        import hashlib

        from train.strategies import full_parameters

        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        params = [p for p in module.parameters() if p.requires_grad]
        digest = hashlib.sha256()
        with full_parameters(module, params):
            for p in params:
                digest.update(p.detach().float().cpu().numpy().tobytes())
            finite = all(bool(p.detach().isfinite().all()) for p in params)
        with open(f"{self.path}.rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "skipped": module.nonfinite_total,
                                "digest": digest.hexdigest(), "finite": finite}) + "\n")
