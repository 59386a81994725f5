"""Optimizers by config (`optimizer.name`), each from the library that maintains it; nothing is re-implemented here.

- `adamw`: torch's AdamW, fused kernels on CUDA (`optimizer.fused=true`: on CPU too), the multi-tensor loop otherwise
  (DeepSpeed's CPU Adam under ZeRO-Offload).
- `lion`: Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms") from lion-pytorch. Takes about 3-10x
  smaller learning rates than AdamW and a larger weight decay; one state tensor per parameter instead of two.
- `muon`: torch.optim.Muon for the 2-D weights of hidden linear layers, AdamW for everything else (embeddings,
  convolutions, biases, norms), stepped together as one optimizer (`optimizer.muon_lr` is Muon's own rate).
- `prodigy`: Prodigy (prodigyopt), which estimates the step size itself: use `optimizer.lr=1.0`.
- `adamw_schedulefree`: schedule-free AdamW (Defazio et al.; the `schedulefree` package): no LR schedule (use
  `lr_scheduler.name=constant`; `lr_scheduler.warmup_steps` becomes the optimizer's own warmup). It keeps two weight
  sequences: the module trains on one and switches the parameters to the averaged one after every step, so EMA,
  sample grids, evaluation and checkpoints all see the averaged weights (`schedule_free_mode`).
- `adamw8bit`, `lion8bit`: bitsandbytes' 8-bit states (CUDA only).

Unknown names and keys that the chosen optimizer does not take fail in one line naming the key.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

OPTIMIZERS = ("adamw", "lion", "muon", "prodigy", "adamw_schedulefree", "adamw8bit", "lion8bit")
SHARDABLE = ("adamw", "lion")  # what DeepSpeed ZeRO / FSDP partition safely (the others see only a shard's statistics)


class Chained(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped as one: Lightning's automatic optimization and the LR
    schedulers see one optimizer whose `param_groups` are the children's own group dicts (a schedule scales both)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        super().__init__([p for o in optimizers for g in o.param_groups for p in g["params"]], {})
        self.param_groups = [g for o in optimizers for g in o.param_groups]

    @property
    def state(self):  # noqa: D102 - the children's states (Lightning moves and inspects them)
        merged: dict = {}
        for o in getattr(self, "optimizers", []):
            merged.update(o.state)
        return merged

    @state.setter
    def state(self, value) -> None:  # torch.optim.Optimizer.__init__ assigns an empty state; the children own it
        pass

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"chained": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        parts = state_dict.get("chained")
        if not isinstance(parts, list) or len(parts) != len(self.optimizers):
            raise ValueError("optimizer: the checkpoint's optimizer state was written by another optimizer.name; "
                             "resume with the same optimizer, or start from the weights only")
        for o, s in zip(self.optimizers, parts):
            o.load_state_dict(s)
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]


def hidden_matrices(modules: Iterable[torch.nn.Module], params: list[torch.nn.Parameter]) -> set[int]:
    """ids of the trainable 2-D weights of linear layers (Muon's domain); embeddings and convolutions stay out."""
    trainable = {id(p) for p in params}
    return {id(m.weight) for root in modules for m in root.modules()
            if isinstance(m, torch.nn.Linear) and id(m.weight) in trainable and m.weight.ndim == 2}


def schedule_free_settings(opt_cfg: dict[str, Any], sched_cfg: dict[str, Any]) -> tuple[dict, dict]:
    """Schedule-free AdamW has its own warmup and refuses a decaying schedule: the warmup moves to the optimizer."""
    if opt_cfg.get("name") == "adamw_schedulefree":
        if sched_cfg.get("name", "constant") != "constant":
            raise ValueError(f"lr_scheduler.name={sched_cfg.get('name')}: optimizer.name=adamw_schedulefree needs no "
                             "schedule; set lr_scheduler.name=constant (warmup_steps is passed to the optimizer)")
        opt_cfg["warmup_steps"], sched_cfg["warmup_steps"] = sched_cfg.get("warmup_steps", 0), 0
    return opt_cfg, sched_cfg


def build_optimizer(cfg: dict[str, Any], params: list[torch.nn.Parameter], modules: Iterable[torch.nn.Module] = (),
                    cpu_offload: bool = False) -> torch.optim.Optimizer:
    """The optimizer `cfg` (the `optimizer` config node) names, over `params`; consumes every key it uses and
    refuses the ones left over."""
    cfg = dict(cfg)
    name = cfg.pop("name", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name: '{name}' is not one of {', '.join(OPTIMIZERS)}")
    lr, weight_decay = float(cfg.pop("lr")), float(cfg.pop("weight_decay", 0.01))
    betas, eps, fused = tuple(cfg.pop("betas", (0.9, 0.999))), float(cfg.pop("eps", 1e-8)), cfg.pop("fused", None)
    muon_lr = cfg.pop("muon_lr", 0.02)
    warmup_steps = int(cfg.pop("warmup_steps", 0))  # schedule-free's own warmup (set from lr_scheduler.warmup_steps)
    if cfg:
        raise ValueError(f"optimizer: unknown key(s) {sorted(cfg)}")
    device = params[0].device.type
    if name.endswith("8bit"):
        if device != "cuda":
            raise ValueError(f"optimizer.name={name}: bitsandbytes' 8-bit optimizers need CUDA parameters; use "
                             f"{name.removesuffix('8bit')} on {device}")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ValueError(f"optimizer.name={name} needs bitsandbytes: pip install bitsandbytes") from e
        if name == "adamw8bit":
            return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        return bnb.optim.Lion8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adamw":
        if cpu_offload:  # ZeRO-Offload steps on the CPU: DeepSpeed's vectorised CPU Adam
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, adamw_mode=True, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        # fused: one kernel per parameter group (CUDA by default; on CPU on request: it rounds differently from the
        # reference loop); otherwise the multi-tensor (foreach) loop, bit for bit the per-parameter loop's result
        fused = device == "cuda" if fused is None else bool(fused)
        kernel = {"fused": True} if fused else {"foreach": True}
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kernel)
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(params, lr=lr, betas=betas[:2], weight_decay=weight_decay)
    if name == "adamw_schedulefree":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 warmup_steps=warmup_steps)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    matrices = hidden_matrices(modules, params)  # muon
    rest = [p for p in params if id(p) not in matrices]
    if not matrices:
        raise ValueError("optimizer.name=muon: no trainable 2-D linear weights (Muon's domain) in this model; "
                         "use adamw")
    muon = torch.optim.Muon([p for p in params if id(p) in matrices], lr=float(muon_lr), weight_decay=weight_decay)
    if not rest:
        return muon
    return Chained([muon, torch.optim.AdamW(rest, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)])


def is_schedule_free(optimizer) -> bool:
    return "train_mode" in (optimizer.param_groups[0] if optimizer.param_groups else {})


def schedule_free_mode(optimizer, train: bool) -> None:
    """Put a schedule-free optimizer's parameters in its training (`train=True`) or averaged sequence; idempotent,
    a no-op for every other optimizer."""
    if is_schedule_free(optimizer) and optimizer.param_groups[0]["train_mode"] != train:
        optimizer.train() if train else optimizer.eval()
