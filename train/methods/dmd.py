"""Distribution matching to a one- or few-step student: DMD2 (Yin et al. 2024), and image-free VSD (SwiftBrush) as
settings of the same code (train/methods/vsd.py).

The student (the trained denoiser, initialised from the teacher) maps noise at the student's timesteps to an image:
x0 = G(x_t, t). Its samples are noised at t ~ U[t_range]; the frozen teacher's guided x0 prediction (the real score)
and a trainable fake-score network's (fitted to the student's own samples) give the distribution-matching gradient
(p_fake - p_real) / mean|x - p_real| on x (DMD's normalisation), applied through a surrogate loss whose gradient in x
is exactly that.

Two time-scale update rule: optimizer steps alternate by `global_step`: `fake_updates` steps train the fake score
(denoising loss on detached student samples, plus the GAN discriminator loss), then one step trains the generator
(distribution matching, plus the GAN generator loss). The phase is a function of the restored step count, so a resume
in the middle of a cycle goes on exactly. The fake score (and the GAN head) train in their own param group
(`fake_lr`) of the one optimizer: optimized, sharded and checkpointed with everything else; a parameter without a
gradient in a step is not stepped (AdamW skips it), so each phase moves only its own networks.

- `fake_score: full` is a trainable copy of the teacher; the teacher is a frozen copy outside every engine (DMD2).
  `lora` is a LoRA over the frozen teacher weights, the teacher being that network with its LoRA off (SwiftBrush).
- `gan_weight` > 0: a small head on the fake score's middle features (UNet mid-block, or the middle transformer
  block) tells noised real images from noised student samples (non-saturating loss); needs image data.
- `student_steps` K > 1: the student samples like LCMScheduler at K steps (x0 prediction, re-noised to the next
  timestep); training picks one of the K steps and reaches its input by running the student itself from noise
  (DMD2's backward simulation, no gradient). Sample it with `sampler=lcm` at K steps.
- `conditioning_timestep` t_c: the student takes pure noise at t_c instead of T-1 (DMD2's SDXL one-step model uses
  399), and its samplers and exports start there (the teacher's schedule cut at t_c). Needed where alpha_bar(T-1) is
  ~0 (a cosine schedule: 2.4e-9 on the digits teacher), since an epsilon student's x0 = (x - sqrt(1-a) eps) / sqrt(a)
  amplifies its errors by 1/sqrt(a) (20,000x there).
- `regression_weight` > 0 with data.kind=coupling: DMD's regression loss on teacher (noise, image) couplings.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from models.adapters import AdapterSpec, adapters_disabled, apply_adapter
from models.components import Components
from models.export import make_sampler
from train.methods.base import Method
from train.sampling import guided


def distribution_matching(x: torch.Tensor, p_real: torch.Tensor, p_fake: torch.Tensor) -> torch.Tensor:
    """Per-sample surrogate whose gradient in `x` is (p_fake - p_real) / mean|x - p_real| / numel(x[i])."""
    with torch.no_grad():
        norm = (x - p_real).abs().flatten(1).mean(1).clamp_min(1e-6).view(-1, *([1] * (x.ndim - 1)))
        grad = (p_fake - p_real) / norm
    return 0.5 * ((x - (x - grad).detach()) ** 2).flatten(1).mean(1)


def middle_module(net: torch.nn.Module) -> torch.nn.Module:
    if getattr(net, "mid_block", None) is not None:
        return net.mid_block
    blocks = getattr(net, "transformer_blocks", None)
    if blocks:
        return blocks[len(blocks) // 2]
    raise ValueError("method.gan_weight: the fake-score network has neither a mid_block nor transformer_blocks to "
                     "read discriminator features from; set method.gan_weight=0")


class FeatureTap:
    """The middle features of a network's last forward, pooled to [B, C]."""

    def __init__(self, net: torch.nn.Module):
        self.features: torch.Tensor | None = None
        middle_module(net).register_forward_hook(self._keep)

    def _keep(self, _module, _inputs, output) -> None:
        h = output[0] if isinstance(output, tuple) else output
        self.features = h.float().mean((2, 3)) if h.ndim == 4 else h.float().mean(1)


class DMD2(Method):
    name = "dmd2"
    objectives = ("epsilon", "v_prediction", "flow")

    def __init__(self, guidance_min: float = 3.0, guidance_max: float = 3.0, fake_score: str = "full",
                 fake_rank: int = 16, fake_updates: int = 5, fake_lr: float | None = None, gan_weight: float = 0.0,
                 student_steps: int = 1, regression_weight: float = 0.0, t_range=(0.02, 0.98),
                 conditioning_timestep: int | None = None, teacher: str | None = None):
        if not 1.0 <= guidance_min <= guidance_max:
            raise ValueError(f"method.guidance_min/max={guidance_min}/{guidance_max}: expected 1 <= min <= max")
        if int(fake_updates) < 1:
            raise ValueError(f"method.fake_updates={fake_updates}: the fake score needs >= 1 update per generator "
                             "update (DMD2 uses 5)")
        if fake_score not in ("full", "lora"):
            raise ValueError(f"method.fake_score={fake_score}: full (a trainable copy) or lora (over the teacher)")
        if int(student_steps) < 1 or gan_weight < 0 or not 0 <= t_range[0] < t_range[1] <= 1:
            raise ValueError(f"method.student_steps={student_steps}, gan_weight={gan_weight}, t_range={list(t_range)}: "
                             "expected steps >= 1, weight >= 0, 0 <= lo < hi <= 1")
        self.g_min, self.g_max = float(guidance_min), float(guidance_max)
        self.fake_kind, self.fake_rank, self.k = fake_score, int(fake_rank), int(fake_updates)
        self.fake_lr, self.gan_weight, self.student_steps = fake_lr, float(gan_weight), int(student_steps)
        self.regression_weight, self.t_range = float(regression_weight), (float(t_range[0]), float(t_range[1]))
        self.t_c = None if conditioning_timestep is None else int(conditioning_timestep)

    # ----- setup -----
    def setup(self, module) -> None:
        if module.has_adapter:
            raise ValueError(f"method={self.name} trains the full student; use adapter=none (the fake score is its "
                             "own network)")
        score = copy.deepcopy(module.unet)
        if self.fake_kind == "lora":
            apply_adapter(Components(score, module.text_encoder, None, None),
                          AdapterSpec(kind="lora", rank=self.fake_rank, target="attn_mlp"))
        else:
            module.require_reference()  # the teacher: a frozen copy outside every engine
        self.fake_score = module.register_trainable("fake_score", score, lr=self.fake_lr)
        self.tap, self.head = None, None
        if self.gan_weight:
            self.tap = FeatureTap(score)
            with torch.no_grad():
                self._score_x0(module, score, *self._probe(module))
            c = self.tap.features.shape[-1]
            head = torch.nn.Sequential(torch.nn.Linear(c, c), torch.nn.SiLU(), torch.nn.Linear(c, 1))
            self.head = module.register_trainable("gan_head", head, lr=self.fake_lr)
        self.timesteps = self._student_timesteps(module)

    def _probe(self, module):
        comps = module.components
        x = torch.zeros(1, comps.in_channels, comps.sample_size, comps.sample_size)
        return x, torch.full((1,), module.core.num_timesteps // 2), module.encode_text(module.empty_prompt_ids(1))

    def _student_timesteps(self, module) -> list[float]:
        """The timesteps the student samples at: the `lcm` sampler's for K steps (VP; from `conditioning_timestep`
        when set), sigmas 1, 1 - 1/K, ... (flow)."""
        T, K = module.core.num_timesteps, self.student_steps
        if module.core.flow:
            if K > 1 or self.t_c is not None:
                raise ValueError("method.student_steps/conditioning_timestep: a flow student samples in one Euler "
                                 "step from sigma 1 (no re-noising sampler for flow students yet); set 1 and null")
            return [float(T)]
        if self.t_c is not None:
            if not 0 < self.t_c < T or (self.t_c + 1) % 50:
                raise ValueError(f"method.conditioning_timestep={self.t_c}: expected t < {T} with t + 1 a multiple of "
                                 "50 (LCMScheduler's grid), e.g. 399 or 899")
            module.components.sampling_horizon = self.t_c  # samplers and exports start there (models/export.py)
        sched = make_sampler(module.components, "lcm")
        sched.set_timesteps(K)
        return [float(t) for t in sched.timesteps]

    # ----- pieces -----
    def _t(self, module, values, n: int) -> torch.Tensor:
        if isinstance(values, (int, float)):
            values = [values] * n
        t = torch.tensor(values, device=module.device)
        return t.float() if module.core.flow else t.long()

    def _score_x0(self, module, net, x_t, t, cond) -> torch.Tensor:
        return module.core.predict_x0(x_t, net(x_t, t, encoder_hidden_states=cond).sample, t)

    def _generate(self, module, noise: torch.Tensor, cond: torch.Tensor, grad: bool = True) -> torch.Tensor:
        """Backward simulation: the student's own samples up to a random one of its K steps, then x0 there."""
        core, gen, n = module.core, module.noise_generator, noise.shape[0]
        i = int(torch.randint(self.student_steps, (1,), generator=gen)) if self.student_steps > 1 else 0
        x = noise
        with torch.no_grad():
            for j in range(i):
                t = self._t(module, self.timesteps[j], n)
                x0 = self._score_x0(module, module.unet, x, t, cond)
                x0 = x0.clamp(-1, 1) if module.vae is None else x0  # as LCMScheduler's clip_sample for pixels
                fresh = torch.randn(x.shape, generator=gen, device=x.device)
                x = core.add_noise(x0, fresh, self._t(module, self.timesteps[j + 1], n))
        with torch.set_grad_enabled(grad):
            return self._score_x0(module, module.unet, x, self._t(module, self.timesteps[i], n), cond)

    def _noised(self, module, x: torch.Tensor):
        core, gen, n = module.core, module.noise_generator, x.shape[0]
        lo, hi = self.t_range
        u = lo + (hi - lo) * torch.rand(n, generator=gen, device=x.device)
        t = u * core.num_timesteps if core.flow else (u * (core.num_timesteps - 1)).round().long()
        return core.noised(x, gen, t=t)

    def _real_x0(self, module, x_t, t, cond, uncond, g) -> torch.Tensor:
        if self.fake_kind == "lora":
            with adapters_disabled(self.fake_score):
                return module.core.predict_x0(x_t, guided(self.fake_score, x_t, t, cond, uncond, g), t)
        with module.reference() as ref:
            return module.core.predict_x0(x_t, guided(ref.unet, x_t, t, cond, uncond, g), t)

    def _logits(self, module, x_t, t, cond) -> torch.Tensor:
        self.fake_score(x_t, t, encoder_hidden_states=cond)
        return self.head(self.tap.features).squeeze(-1)

    def phase(self, step: int) -> str:
        return "fake" if step % (self.k + 1) < self.k else "generator"

    # ----- the loss -----
    def loss(self, batch: dict[str, Any], module) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"]
        n = ids.shape[0]
        cond = module.batch_context(batch).detach()
        comps = module.components
        noise = batch.get("noise")
        if noise is None:
            noise = torch.randn((n, comps.in_channels, comps.sample_size, comps.sample_size),
                                generator=module.noise_generator, device=module.device)
        if self.phase(module.global_step) == "fake":
            return self._fake_loss(batch, module, noise, cond)
        return self._generator_loss(batch, module, noise, cond)

    def _fake_loss(self, batch, module, noise, cond) -> dict[str, torch.Tensor]:
        x = self._generate(module, noise, cond, grad=False)
        d = self._noised(module, x)
        pred = self.fake_score(d.x_t, d.t, encoder_hidden_states=cond).sample
        fake = module.core.per_sample_error(pred, d.target)
        out = {"loss": fake, "fake_score_loss": fake.detach()}
        if self.head is not None:  # the denoising forward above left the student samples' features in the tap
            d_fake = self.head(self.tap.features).squeeze(-1)
            real = self._noised(module, module.batch_x0(batch))
            d_real = self._logits(module, real.x_t, real.t, cond)
            disc = F.softplus(-d_real) + F.softplus(d_fake)
            out["loss"] = out["loss"] + self.gan_weight * disc
            out["gan_discriminator"] = disc.detach()
        return out

    def _generator_loss(self, batch, module, noise, cond) -> dict[str, torch.Tensor]:
        n = noise.shape[0]
        x = self._generate(module, noise, cond)
        d = self._noised(module, x.detach())
        g = self.g_min + torch.rand(n, generator=module.noise_generator, device=x.device) * (self.g_max - self.g_min)
        with torch.no_grad():
            uncond = module.encode_text(module.empty_prompt_ids(n))
            p_real = self._real_x0(module, d.x_t, d.t, cond, uncond, g)
            p_fake = self._score_x0(module, self.fake_score, d.x_t, d.t, cond)
        dm = distribution_matching(x, p_real, p_fake)
        out = {"loss": dm, "distribution_matching": dm.detach()}
        if self.head is not None:  # the generator's GAN term: its gradient reaches x only, never the fake score
            x_t = module.core.add_noise(x, d.noise, d.t)
            leaf = x_t.detach().requires_grad_(True)
            gen_gan = F.softplus(-self._logits(module, leaf, d.t, cond))
            (gx,) = torch.autograd.grad(gen_gan.sum(), leaf)
            surrogate = (gx * x_t).flatten(1).sum(1)
            out["loss"] = out["loss"] + self.gan_weight * (surrogate - surrogate.detach() + gen_gan.detach())
            out["gan_generator"] = gen_gan.detach()
        if self.regression_weight and "x0" in batch and "noise" in batch:  # couplings: x0 is in the UNet's space
            reg = module.core.per_sample_error(x, batch["x0"].to(x))
            out["loss"] = out["loss"] + self.regression_weight * reg
            out["regression"] = reg.detach()
        return out
