"""Concept erasure (Gandikota et al., "Erasing Concepts from Diffusion Models", ESD), and LECO-style redirection.

On states x_t from the frozen model's own trajectory for the concept prompt, the fine-tuned conditional
prediction for the concept regresses onto the frozen model's guided prediction

    target = e(x_t, "") + guidance * (e(x_t, direction) - e(x_t, ""))

with direction = the concept itself (guidance < 0 erases it: ESD) or an `anchor` prompt (guidance > 0 pulls the
concept toward the anchor: LECO-style). `params` picks what trains without an adapter: xattn (cross-attention,
ESD-x: erases the word), noxattn (ESD-u: erases the visual concept everywhere) or all. With an adapter
(adapter.target=xattn is the usual choice), the adapter is what trains, and its scale at load time sets the strength.

`preserve` lists prompts that must keep their meaning: a `preserve_fraction` of every batch samples trajectories for
them instead, and there the fine-tuned prediction regresses onto the frozen model's own conditional one (weight
`preserve_weight`). Related prompts share most tokens ("a handwritten digit seven" / "... one"), so without it
erasing one concept drags its neighbours along. With `preserve_empty_prompt` (default) the empty prompt is preserved
too: classifier-free guidance steers every prompt against it, so letting it drift moves all of them.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from models.tokens import tokenize
from train.methods.base import Method
from train.sampling import ddim_scheduler, guided, sample

log = logging.getLogger(__name__)
PARAM_SETS = ("xattn", "noxattn", "all")


class ConceptErasure(Method):
    name = "erase"

    def __init__(self, concept: str, guidance: float = -1.0, anchor: str | None = None, params: str = "xattn",
                 sample_steps: int = 25, sample_guidance: float = 3.0, preserve: list[str] | None = None,
                 preserve_fraction: float = 0.5, preserve_weight: float = 1.0, preserve_empty_prompt: bool = True):
        if not concept or not str(concept).strip():
            raise ValueError("method.concept is empty; give the prompt to erase, e.g. 'a handwritten digit seven'")
        if params not in PARAM_SETS:
            raise ValueError(f"method.params: '{params}' is not one of {', '.join(PARAM_SETS)}")
        if anchor is None and guidance >= 0:
            raise ValueError(f"method.guidance={guidance}: erasing needs a negative guidance (or set method.anchor "
                             "to pull the concept toward another prompt)")
        self.concept, self.guidance, self.anchor, self.params = str(concept), float(guidance), anchor, params
        if int(sample_steps) < 2:
            raise ValueError(f"method.sample_steps={sample_steps}: erasure stops the sampler at a random step in "
                             "1..sample_steps-1; give 2 or more")
        self.sample_steps, self.sample_guidance = int(sample_steps), float(sample_guidance)
        self.preserve = [str(p) for p in preserve or [] if str(p) != self.concept]
        if self.preserve and preserve_empty_prompt and "" not in self.preserve:
            # the unconditional prediction is half of every guided sample: keep it the frozen model's
            self.preserve.append("")
        if not 0 <= preserve_fraction < 1:
            raise ValueError(f"method.preserve_fraction={preserve_fraction}: expected [0, 1)")
        self.preserve_fraction = preserve_fraction if self.preserve else 0.0
        self.preserve_weight = float(preserve_weight)

    def setup(self, module) -> None:
        module.require_reference()
        if module.has_adapter:
            return  # the adapter's target decides what trains
        for name, p in module.unet.named_parameters():
            cross = ".attn2." in name
            p.requires_grad_({"xattn": cross, "noxattn": not cross, "all": True}[self.params])
        log.info("erase: training %s parameters (%d tensors)", self.params,
                 sum(1 for p in module.unet.parameters() if p.requires_grad))

    def _ids(self, module, prompts: list[str] | str, n: int | None = None) -> torch.Tensor:
        prompts = [prompts] * n if isinstance(prompts, str) else prompts
        return tokenize(module.components.tokenizer, prompts).to(module.device)

    def loss(self, batch: dict[str, Any], module) -> dict[str, torch.Tensor]:
        n = batch["input_ids"].shape[0]  # the data stream only sets the batch size
        gen = module.noise_generator
        n_keep = min(n - 1, round(n * self.preserve_fraction))
        picks = torch.randint(0, max(1, len(self.preserve)), (n_keep,), generator=gen, device=module.device)
        prompts = [self.concept] * (n - n_keep) + [self.preserve[int(i)] for i in picks]
        ids, ids_u = self._ids(module, prompts), self._ids(module, "", n)
        sched = ddim_scheduler(module.core.scheduler, self.sample_steps, clip_sample=module.vae is None)
        k = int(torch.randint(1, self.sample_steps, (1,), generator=gen, device=module.device))
        size = module.components.sample_size
        x_T = torch.randn((n, module.components.in_channels, size, size), generator=gen, device=module.device)
        erase = torch.arange(n, device=module.device) < n - n_keep
        with module.reference() as ref:
            cond, uncond = ref.encode_text(ids), ref.encode_text(ids_u)
            x_t = sample(lambda x, t: guided(ref.unet, x, t, cond, uncond, self.sample_guidance), sched, x_T,
                         stop_at=k).final
            t = torch.full((n,), int(sched.timesteps[k]), device=module.device, dtype=torch.long)
            direction = cond if self.anchor is None else ref.encode_text(self._ids(module, self.anchor, n))
            moved = guided(ref.unet, x_t, t, direction, uncond, self.guidance)  # CFG at a negative scale: ESD
            kept = ref.unet(x_t, t, encoder_hidden_states=cond).sample if n_keep else moved
            target = torch.where(erase.view(-1, 1, 1, 1), moved, kept)
        pred = module.unet(x_t, t, encoder_hidden_states=module.encode_text(ids)).sample
        err = module.core.per_sample_error(pred, target)
        out = {"loss": torch.where(erase, err, self.preserve_weight * err), "timestep": t.float()}
        if n_keep:
            out["erase_loss"], out["preserve_loss"] = err[erase].detach().mean(), err[~erase].detach().mean()
        return out
