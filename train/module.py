"""DiffusionModule: the one training loop. Methods supply a per-sample loss; nothing overrides this step.

It owns the trained network(s), the optimizer and LR schedule, the non-finite guard, the encoders' caches and the
data-skip accounting. EMA, sampling, evaluation and throughput live in callbacks."""
from __future__ import annotations

import contextlib
import logging
from collections import Counter
from functools import partial
from typing import Any, Iterator

import lightning as L
import torch
from diffusers.optimization import get_scheduler

from data.webdataset import derive_seed
from models.components import Components
from models.fingerprint import CHECKPOINT_DIGITS, weights_fingerprint
from models.masking import PatchMasking
from models.repa import RepresentationAlignment, load_encoder
from models.tokens import tokenize
from train.checkpoint import check_family, check_fingerprint, check_state_dict
from train.diffusion import DiffusionCore
from train.methods.base import Method, MethodView
from train.nonfinite import StepGuard, gradients_finite, skip_loss
from train.optim import build_optimizer, schedule_free_mode, schedule_free_settings
from train.precision import prepare_frozen
from train.reference import FrozenReference
from train.row_cache import RowCache, text_keys
from train.strategies import accumulation_boundary, is_deepspeed, is_fp16, offloads_optimizer, step_rejected_by_strategy

log = logging.getLogger(__name__)


class DiffusionModule(FrozenReference, L.LightningModule):
    def __init__(self, components: Components, core: DiffusionCore, method: Method,
                 optimizer: dict[str, Any] | None = None, lr_scheduler: dict[str, Any] | None = None,
                 max_nonfinite_steps: int = 5, seed: int = 0, masking: dict[str, Any] | None = None,
                 repa: dict[str, Any] | None = None, text_cache_mb: float = 64.0, latent_cache_mb: float = 1024.0):
        super().__init__()
        self.components = components
        self.unet = components.unet
        # Frozen sub-models are held outside the module tree: a strategy (DDP, FSDP, a DeepSpeed ZeRO-3 engine) wraps
        # and shards only what trains, while these stay whole on every rank. `_apply` still moves and casts them.
        self._frozen_names: tuple[str, ...] = ()
        self._reference_copy: dict[str, torch.nn.Module] = {}  # a plain dict: not a submodule, not in any engine
        self._hold("text_encoder", components.text_encoder)
        self._hold("vae", components.vae)
        self.core = core
        self.method = method
        self.optimizer_cfg = dict(optimizer or {"name": "adamw", "lr": 1e-4})
        self.lr_scheduler_cfg = dict(lr_scheduler or {"name": "constant", "warmup_steps": 0})
        self.max_nonfinite_steps = max_nonfinite_steps
        self.seed = seed
        self._generator: torch.Generator | None = None
        self.text_cache = RowCache(text_cache_mb)  # frozen encoders' outputs of repeated inputs (train/row_cache.py)
        self.latent_cache = RowCache(latent_cache_mb, evict=False, host=True)
        self.guard = StepGuard(max_nonfinite_steps, on_skip=self._log_skip)  # train/nonfinite.py
        self.skipped: Counter[str] = Counter()
        self.source_counts: Counter[str] = Counter()  # samples per dataset of a mixture
        self.run_config: dict[str, Any] | None = None  # the resolved run config, saved in every checkpoint
        # Frozen weights are rebuilt from the config (preset seed or local folder), not stored in checkpoints, so a
        # LoRA checkpoint is megabytes; the fingerprint catches a base that changed on disk since.
        self.strict_loading = False
        self._last_method_step = -1
        self._own_groups: dict[str, dict[str, Any]] = {}  # register_trainable's param-group settings
        masking = dict(masking or {})
        self.masking = PatchMasking(self.unet, **masking) if masking.get("ratio") else None
        repa = dict(repa or {})
        encoder = repa.pop("encoder", None)
        # a child module: its projector trains and is checkpointed; the frozen encoder is held beside it
        self.repa = RepresentationAlignment(self.unet, load_encoder(encoder), **repa) if encoder else None
        core.require(method.objectives, f"method={method.name}", method.objective_hint)
        self.view = MethodView(self)  # what the method sees of this module (train/methods/base.py)
        method.setup(self.view)  # may freeze parameters (erasure trains cross-attention only) or copy a reference
        self._frozen_fingerprint = self.frozen_fingerprint()

    def _hold(self, name: str, model: torch.nn.Module | None) -> None:
        """Register `model` when anything in it trains; otherwise keep it as a plain attribute (frozen, in eval)."""
        if model is not None and any(p.requires_grad for p in model.parameters()):
            setattr(self, name, model)
            return
        if model is not None:
            model.eval()
            self._frozen_names += (name,)
        object.__setattr__(self, name, model)  # bypasses nn.Module registration: not a child, not in state_dict

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        """Every frozen network the module holds outside its tree (encoders, reference copies), by name."""
        out = {name: getattr(self, name) for name in self._frozen_names if getattr(self, name) is not None}
        out.update({f"reference.{k}": m for k, m in self._reference_copy.items()})
        return out

    def _apply(self, fn, recurse: bool = True):
        """`.to(device)`, `.bfloat16()` and the like reach the frozen models too (once each, when shared)."""
        super()._apply(fn, recurse)
        self.text_cache.clear()  # their rows were made on the old device / in the old dtype
        self.latent_cache.clear()
        seen = {id(m) for m in self.modules()}
        for model in self.frozen_models().values():
            if id(model) not in seen:
                seen.add(id(model))
                model._apply(fn)
        return self

    # ----- encoders shared by every method -----
    def encode_images(self, pixels: torch.Tensor, keys: list[bytes] | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> the space the UNet works in (latents when a VAE is present); the latent distribution
        of images seen before (host `keys`, from the loader) comes from the latent cache."""
        if self.vae is None:
            return pixels
        with torch.no_grad():
            encode = partial(self.components.spec.encode_latents, self.vae)
            return self.sample_latents(*self.latent_cache.encode(encode, pixels, keys))

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """A draw from the VAE's latent distribution, from the module's noise generator (reproducible on resume)."""
        noise = torch.randn(mean.shape, generator=self.noise_generator, device=mean.device, dtype=torch.float32)
        return (mean.float() + std.float() * noise).to(mean.dtype)

    def batch_x0(self, batch: dict[str, Any]) -> torch.Tensor:
        """A batch's clean samples in the UNet's space: cached latents (`foundry-shards encode`) when the batch
        carries them, else its pixels through the VAE (latent models) or as they are (pixel models)."""
        if "latent_mean" in batch:
            return self.sample_latents(batch["latent_mean"], batch["latent_std"])
        return self.encode_images(batch["pixels"], keys=batch.get("pixel_keys"))

    def batch_context(self, batch: dict[str, Any]) -> torch.Tensor:
        """A batch's text context: cached embeddings when present (rows whose caption was dropped get the empty
        prompt's), else the text encoder on its token ids."""
        cached = batch.get("context")
        if cached is None:
            return self.encode_text(batch["input_ids"], keys=batch.get("id_keys"))
        dropped = batch["context_dropped"].to(cached.device)
        if bool(dropped.any()):
            empty = self.encode_text(self.empty_prompt_ids(1)).to(cached.dtype)
            cached = torch.where(dropped[:, None, None], empty.expand_as(cached), cached)
        return cached

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """The UNet's space -> images in [-1, 1] (through the VAE for latent models); differentiable."""
        if self.vae is not None:
            x0 = self.components.spec.decode_latents(self.vae, x0)
        return x0.float().clamp(-1, 1)

    def empty_prompt_ids(self, n: int) -> torch.Tensor:
        """Token ids of the empty prompt (the unconditional branch of classifier-free guidance), [n, L]."""
        if getattr(self, "_empty_ids", None) is None:
            self._empty_ids = tokenize(self.components.tokenizer, [""])
        return self._empty_ids.to(self.device).expand(n, -1)

    def encode_text(self, input_ids: torch.Tensor, keys: list[bytes] | None = None) -> torch.Tensor:
        """The text context of token ids; a frozen encoder's rows come from the text cache when seen before."""
        if any(p.requires_grad for p in self.text_encoder.parameters()):
            return self.text_encoder(input_ids)[0]
        with torch.no_grad():
            return self.text_cache.encode(lambda ids: (self.text_encoder(ids)[0],), input_ids,
                                          text_keys(input_ids, keys))[0]

    @contextlib.contextmanager
    def patch_masking(self, x: torch.Tensor) -> Iterator[torch.Tensor | None]:
        """Deferred masking (models/masking.py) around a training forward on `x`: yields the pixel mask of kept
        patches for the loss, or None when masking is off, finished (`unmasked_from`) or the module is not training."""
        trainer = self.attached_trainer
        max_steps = trainer.max_steps if trainer is not None else None
        if self.masking is None or not self.training or not self.masking.active(self.global_step, max_steps):
            yield None
            return
        with self.masking.apply(x, self.noise_generator) as mask:
            yield mask

    @contextlib.contextmanager
    def alignment(self) -> Iterator[RepresentationAlignment | None]:
        """REPA (models/repa.py) around a training forward: yields the aligner that recorded the hidden state, or
        None when REPA is off or the module is not training."""
        if self.repa is None or not self.training:
            yield None
            return
        with self.repa.capture() as repa:
            yield repa

    @contextlib.contextmanager
    def micro_conditioning(self, time_ids: torch.Tensor | None) -> Iterator[None]:
        """A bucketed batch's SDXL size/crop conditioning for the UNet's forwards in the block (SDXL UNets only;
        other backbones have no such input and ignore it)."""
        if time_ids is None or not hasattr(self.unet, "micro_conditioning"):
            yield
            return
        self.unet.micro_conditioning = time_ids
        try:
            yield
        finally:
            self.unet.micro_conditioning = None

    @property
    def noise_generator(self) -> torch.Generator:
        """The RNG methods draw noise and timesteps from, reseeded per micro-batch in `training_step`.

        Its seed is a function of (seed, rank, epoch, batch index), all of which a checkpoint restores, so a
        resumed run draws exactly the noise an uninterrupted one would, on any number of ranks, and nothing
        else that touches the global RNG (DataLoader start-up, sampling callbacks) can shift it.
        """
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
        return self._generator

    # ----- services a method may use (train/methods/base.py METHOD_INTERFACE) -----
    @property
    def method_name(self) -> str:
        return self.method.name

    @property
    def kept_patches(self) -> torch.Tensor | None:
        """The patch indices the current masked forward keeps (None without masking)."""
        return self.masking.kept if self.masking is not None else None

    @property
    def world_size(self) -> int:
        trainer = self._trainer
        return int(trainer.world_size) if trainer is not None else 1

    @property
    def accumulate_grad_batches(self) -> int | None:
        """Micro-batches per optimizer step (None outside `fit`)."""
        trainer = self._trainer
        return int(trainer.accumulate_grad_batches) if trainer is not None else None

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` from every rank, stacked on a new first dimension ([world, ...]); as is on one process."""
        return self.all_gather(tensor) if self.world_size > 1 else tensor[None]

    def register_trainable(self, name: str, model: torch.nn.Module, **group: Any) -> torch.nn.Module:
        """A network the method trains beside the denoiser (DMD2's fake score): optimized, sharded and checkpointed;
        `group` (lr, betas, weight_decay; None: the run's) gives it its own param group in the one optimizer."""
        self.add_module(name, model)
        self._own_groups[name] = {k: v for k, v in group.items() if v is not None}
        return model

    @property
    def attached_trainer(self):
        """The trainer, or None outside `fit` (methods called directly by tests and tools)."""
        return self._trainer

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ----- the loop -----
    def training_step(self, batch: dict[str, Any], batch_idx: int):
        self._account_skipped(batch.get("skipped") or {})
        if batch.get("sources"):
            self._account_sources(batch["sources"])
        self.noise_generator.manual_seed(
            derive_seed(self.seed, self.global_rank, self.current_epoch, batch_idx))
        with self.micro_conditioning(batch.get("time_ids")):
            out = self.method.loss(batch, self.view)
        loss = out["loss"].mean()
        if self._checks_gradients:  # read with the gradients' check, one host sync per step (on_before_optimizer_step)
            self.guard.note_loss(torch.isfinite(loss.detach()))
        elif not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            self.guard.reject("loss")  # on any rank: every rank backpropagates a zero loss and drops the step
            return skip_loss(out["loss"])
        bs = out["loss"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for key, value in out.items():
            if key != "loss":
                self.log(f"train/{key}", value.detach().float().mean(), batch_size=bs)
        return loss

    def _schedule_free(self, train: bool) -> None:
        trainer = self.attached_trainer
        for opt in (trainer.optimizers if trainer is not None else []):
            schedule_free_mode(opt, train)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._schedule_free(train=True)  # forward/backward on schedule-free's training sequence (every micro-batch)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        boundary = accumulation_boundary(self.trainer.strategy)  # DeepSpeed steps only on its own boundary
        if optimizer_closure is not None and not is_fp16(self.trainer) and not is_deepspeed(self.trainer.strategy):
            # the closure runs inside `step`, after the pre-hooks (GradScaler/DeepSpeed step after it: the pre-hook)
            optimizer_closure = self.guard.wrap_closure(optimizer, optimizer_closure)
        self._schedule_free(train=True)  # its step (which runs the closure) must start in training mode
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._schedule_free(train=False)  # after each step the parameters hold the averaged weights: EMA, sample
        # grids, evaluation and checkpoints read those (a no-op for other optimizers)
        if boundary:
            rejected = step_rejected_by_strategy(self.trainer.strategy) and not is_fp16(self.trainer)
            self.guard.finish(self.global_step, rejected_by_strategy=rejected)

    def on_train_start(self) -> None:
        self._last_method_step = self.global_step

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.global_step != self._last_method_step:  # an optimizer step happened (accumulation-aware)
            self._last_method_step = self.global_step
            self.method.on_step_end(self.view)

    def setup(self, stage: str) -> None:  # before the strategy wraps and moves the model (train/precision.py)
        prepare_frozen(self, {"unet": self.unet, **self.frozen_models()}, self.trainer.strategy, self.trainer.precision)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Reject a step whose loss or gradients are not finite on any rank: both flags read in one host sync."""
        if not self._checks_gradients:
            return
        flags = self.guard.take_loss_flag(self.device)
        local = gradients_finite([p for group in optimizer.param_groups for p in group["params"]])
        flags = torch.stack([flags, local if local is not None else torch.ones_like(flags)]).float()
        loss_ok, grads_ok = self.trainer.strategy.reduce(flags, reduce_op="min").tolist() if self.world_size > 1 \
            else flags.tolist()  # the one host read of the step (the all-reduce stays on the device)
        if not (loss_ok and grads_ok):
            self.guard.reject("loss" if not loss_ok else "gradient")
            self.guard.drop_if_rejected(optimizer)

    @property
    def _checks_gradients(self) -> bool:
        """The loss and gradient checks run together before the optimizer step; fp16 leaves both to its loss scaler,
        DeepSpeed keeps gradients in its partitions (the loss is checked in the step, the gradients by the engine)."""
        return not (is_fp16(self.trainer) or is_deepspeed(self.trainer.strategy))

    def _log_skip(self, reason: str, total: int) -> None:
        self.log("train/nonfinite_steps", float(total))

    @property
    def nonfinite_total(self) -> int:
        return self.guard.total

    @property
    def nonfinite_streak(self) -> int:
        return self.guard.streak

    def _account_sources(self, sources: list[str]) -> None:
        """Samples seen per dataset of a mixture (`data/samples/<name>`, all ranks; restored on resume)."""
        self.source_counts.update(sources)
        for name in sorted(set(sources)):
            self.log(f"data/samples/{name}", float(self.source_counts[name]), reduce_fx="sum", sync_dist=True)

    def _account_skipped(self, skipped: dict[str, int]) -> None:
        for reason, n in skipped.items():
            self.skipped[reason] += int(n)
        self.log("data/skipped", float(sum(self.skipped.values())), reduce_fx="sum", sync_dist=True)
        for reason in skipped:  # per reason, so a user sees *why* data is being dropped
            self.log(f"data/skipped/{reason}", float(self.skipped[reason]), reduce_fx="sum", sync_dist=True)
        for reason, n in skipped.items():
            if n:
                log.warning("skipped %d corrupt sample(s) (%s); %d so far", n, reason, sum(self.skipped.values()))

    # ----- optimizer -----
    def configure_optimizers(self):
        own = {n: [p for p in getattr(self, n).parameters() if p.requires_grad] for n, g in self._own_groups.items() if g}
        taken = {id(p) for ps in own.values() for p in ps}
        params = [p for p in self.trainable_parameters() if id(p) not in taken]
        if not params:
            raise ValueError("optimizer: the model has no trainable parameters; check model/adapter settings")
        opt_cfg, sched_cfg = schedule_free_settings(dict(self.optimizer_cfg), dict(self.lr_scheduler_cfg))
        optimizer = build_optimizer(opt_cfg, params, modules=(self.unet, self.text_encoder),
                                    cpu_offload=offloads_optimizer(self._trainer))
        for name, ps in own.items():  # a method's own network with its own settings (DMD2's fake score)
            optimizer.add_param_group({"params": ps, **self._own_groups[name]})
        self.guard.install(optimizer)  # drops a rejected step inside the optimizer, under every strategy
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else 10**9
        scheduler = get_scheduler(sched_cfg.pop("name", "constant"), optimizer,
                                  num_warmup_steps=sched_cfg.pop("warmup_steps", 0), num_training_steps=total)
        if sched_cfg:
            raise ValueError(f"lr_scheduler: unknown key(s) {sorted(sched_cfg)}")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----- state that must survive resume -----
    def frozen_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if not p.requires_grad}

    def _frozen_named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        yield from ((n, p) for n, p in self.named_parameters() if not p.requires_grad)
        for prefix in self._frozen_names:
            yield from ((f"{prefix}.{n}", p) for n, p in getattr(self, prefix).named_parameters())

    def frozen_fingerprint(self) -> str:
        """A cheap digest of the frozen weights (models/fingerprint.py), to refuse resuming onto a different base."""
        return weights_fingerprint(self._frozen_named_parameters(), CHECKPOINT_DIGITS)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self.frozen_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["foundry"] = {"skipped": dict(self.skipped), "source_counts": dict(self.source_counts),
                                 "nonfinite_total": self.guard.total, "config": self.run_config,
                                 "frozen_fingerprint": self._frozen_fingerprint, "family": self.components.family,
                                 "method": self.method.state_dict(self.view)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("foundry", {})
        check_family(self, state.get("family"))
        self.skipped = Counter(state.get("skipped", {}))
        self.source_counts = Counter(state.get("source_counts", {}))
        self.guard.total = int(state.get("nonfinite_total", 0))
        self.method.load_state_dict(state.get("method") or {}, self.view)
        if "state_dict" in checkpoint:  # DeepSpeed restores the weights from its own shards, not from this dict
            check_state_dict(self, checkpoint["state_dict"], state.get("frozen_fingerprint"))
        else:
            check_fingerprint(self, state.get("frozen_fingerprint"))

