"""The memory planner: for a composed run config, the peak memory per device before launch, broken down, and whether
it fits (`foundry-plan`, `launcher.dry_run=true`).

Activations are not a table: one training forward and backward of the configured denoiser (its adapter, gradient
checkpointing, precision, batch and resolution) runs on fake tensors (`torch._subclasses.FakeTensorMode`: shapes and
dtypes, no memory, no FLOPs), and a dispatch mode counts the bytes of every live tensor storage as the step runs; its
peak above the weights is what the step needs. PyTorch's own `MemTracker` does the same bookkeeping but registers a
gradient hook on every parameter, which fails on a frozen base, hence this small counter. The rest is arithmetic on
parameter counts and the settings: weights by dtype (trained, frozen, quantized), gradients, optimizer state
(8-bit, offloaded, ZeRO-sharded by world size), EMA, frozen text encoders and VAE (absent when the data are cached
latents). Full-size models plan from meta-device builds (models/real_sizes.py): no weights on disk.

What it does not count: the CUDA context and allocator fragmentation (the `overhead` row: a fixed margin), methods
that run more than one denoiser pass per step (a teacher, a reference, rollouts), and the data loader's host memory.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from models.adapters import AdapterSpec, apply_adapter
from models.block_swap import transformer_blocks
from models.components import Components, tokenize
from models.quantize import BYTES_PER_WEIGHT, MIN_FEATURES
from models.real_sizes import real_size
from train.precision import frozen_dtype

GIB = 2**30
DTYPES = {"32-true": (torch.float32, None), "32": (torch.float32, None), "bf16-mixed": (torch.float32, torch.bfloat16),
          "16-mixed": (torch.float32, torch.float16), "bf16-true": (torch.bfloat16, None),
          "16-true": (torch.float16, None)}
# optimizer state in bytes per trained parameter (fp32 moments; 8-bit: one byte each plus block scales)
OPTIMIZER_BYTES = {"adamw": 8, "lion": 4, "muon": 4, "prodigy": 16, "adamw_schedulefree": 8, "adamw8bit": 2.04,
                   "lion8bit": 1.02}
ACTIVATIONS = "activations + gradients (traced)"
ONE_PASS_METHODS = ("Denoise", "DreamBooth", "Reflow")  # one denoiser forward/backward per step
CUDA_OVERHEAD = 0.8 * GIB  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack: a margin, not a measurement


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops create, live at each moment, and their peak (works on fake tensors)."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        # storages that exist before the step (weights, inputs) are not allocations when an op returns a view of
        # them (`weight.t()` in every linear layer); their storage objects are held so their ids stay theirs
        self._existing = [t.untyped_storage() for t in existing]
        self._existing_ids = {id(st) for st in self._existing}

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.live or key in self._existing_ids:
            return
        self.live[key] = storage.nbytes()
        self.current += self.live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def trace_step_bytes(model: torch.nn.Module, inputs: Callable[[], dict[str, Any]], autocast: torch.dtype | None,
                     grad: bool = True) -> int:
    """Peak bytes one forward (and backward, with `grad`: gradients included) of `model` allocates beyond its
    weights, on fake tensors.

    `model` must be on the meta device (it is materialized as fake tensors in place, so pass a copy you can drop)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        model.train(grad)
        kwargs = inputs()
        tracker = LiveBytes([*model.parameters(), *model.buffers(),
                             *(t for t in pytree.tree_leaves(kwargs) if isinstance(t, torch.Tensor))])
        ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else torch.autocast("cpu", enabled=False)
        with tracker, ctx, torch.set_grad_enabled(grad):
            out = model(**kwargs, return_dict=False)[0]
            out = out if torch.is_tensor(out) else torch.stack(list(out))
            if grad:
                out.float().pow(2).mean().backward()
        return tracker.peak


@dataclass
class Settings:
    """What the plan depends on, read from a run config (or set by hand for full-size models)."""

    batch: int = 1
    resolution: int = 1024
    precision: str = "bf16-mixed"
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    gradient_checkpointing: bool = False
    quantize: str = "none"
    quantize_text_encoder: bool = False
    block_swap: int = 0
    optimizer: str = "adamw"
    zero_stage: int = 0  # 0: no ZeRO (DDP or one device); 2, 3: DeepSpeed
    offload_optimizer: bool = False
    world_size: int = 1
    ema: bool = False
    cached: bool = False  # cached latents and text embeddings: no text encoder or VAE in memory
    device: str = "cuda"
    train_text_encoder: bool = False

    def label(self) -> str:
        parts = [f"batch {self.batch}", f"{self.resolution}px", self.precision]
        if self.adapter.enabled:
            parts.append(f"{self.adapter.kind} r{self.adapter.rank}")
        for on, text in ((self.gradient_checkpointing, "checkpointing"), (self.quantize != "none", self.quantize),
                         (self.quantize_text_encoder, "text encoder quantized"),
                         (self.optimizer != "adamw", self.optimizer),
                         (self.block_swap, f"block swap {self.block_swap}"), (self.zero_stage, f"ZeRO-{self.zero_stage}"),
                         (self.offload_optimizer, "optimizer offload"), (self.ema, "EMA"), (self.cached, "cached")):
            if on:
                parts.append(text)
        return ", ".join(parts)


@dataclass
class MemoryPlan:
    rows: dict[str, float]  # bytes per device by category
    settings: Settings
    gpu_memory_gb: float
    host_rows: dict[str, float] = field(default_factory=dict)  # what lives in CPU memory instead
    notes: list[str] = field(default_factory=list)
    suggestions: list[tuple[str, float]] = field(default_factory=list)  # (setting, its peak in bytes)

    @property
    def peak(self) -> float:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_memory_gb * GIB

    def to_json(self) -> dict[str, Any]:
        return {"peak_gib": round(self.peak / GIB, 3), "fits": self.fits, "gpu_memory_gb": self.gpu_memory_gb,
                "settings": self.settings.label(), "rows_gib": {k: round(v / GIB, 3) for k, v in self.rows.items()},
                "host_gib": {k: round(v / GIB, 3) for k, v in self.host_rows.items()}, "notes": self.notes,
                "suggestions": [{"set": s, "peak_gib": round(b / GIB, 3)} for s, b in self.suggestions]}

    def table(self) -> str:
        lines = [f"memory plan per device ({self.settings.label()}):"]
        lines += [f"  {name:<34} {value / GIB:9.2f} GiB" for name, value in self.rows.items() if value]
        lines.append(f"  {'peak':<34} {self.peak / GIB:9.2f} GiB of {self.gpu_memory_gb:g} GB: "
                     f"{'fits' if self.fits else 'does NOT fit'}")
        lines += [f"  in CPU memory: {name} {value / GIB:.2f} GiB" for name, value in self.host_rows.items() if value]
        lines += [f"  note: {n}" for n in self.notes]
        if not self.fits:
            lines += ["  would fit with (in this order, each on top of the ones before):" if self.suggestions else "  nothing listed makes it fit; use more GPUs "
                      "(strategy=deepspeed_stage3) or a larger GPU"]
            lines += [f"    {s}  ->  {b / GIB:.2f} GiB" for s, b in self.suggestions]
        return "\n".join(lines)


@dataclass
class Parts:
    """The model as the planner sees it: modules on the meta device and the denoiser's inputs."""

    family: str
    denoiser: Callable[[], torch.nn.Module]  # a fresh meta copy each call
    text_encoders: list[torch.nn.Module]
    vae: torch.nn.Module | None
    inputs: Callable[[int, int], dict[str, Any]]  # (batch, resolution) -> the denoiser's keyword arguments


def parts_for_real_size(name: str) -> Parts:
    """A full-size model (models/real_sizes.py) on the meta device."""
    r = real_size(name)
    return Parts(r.family, r.denoiser, [build() for build in r.text_encoders], r.vae(), r.inputs)


def parts_for_components(comps: Components) -> Parts:
    """A built run's model (a preset or a loaded folder): meta copies of its denoiser, the context shape its text
    encoder produces."""
    with torch.no_grad():
        context = comps.text_encoder(tokenize(comps.tokenizer, [""]).to(comps.text_encoder.device))[0]
    ctx_shape = tuple(context.shape[1:])

    def inputs(batch: int, resolution: int) -> dict[str, Any]:
        return comps.spec.planning_inputs(comps, batch, resolution, ctx_shape)

    return Parts(comps.family, lambda: meta_copy(comps.unet), [comps.text_encoder], comps.vae, inputs)


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """`model` on the meta device without copying a byte of its weights (a deep copy whose memo maps every
    parameter and buffer to an empty meta tensor of the same shape)."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) \
            else meta
    return copy.deepcopy(model, memo)


def _nbytes(params, dtype: torch.dtype | None = None) -> float:
    return float(sum(p.numel() * (dtype.itemsize if dtype is not None else p.element_size()) for p in params))


def _quantized_bytes(model: torch.nn.Module, kind: str, weight_dtype: torch.dtype) -> tuple[float, float]:
    """(bytes the eligible frozen linear weights take in `weight_dtype`, bytes they take quantized)."""
    full = quant = 0.0
    for m in model.modules():
        if type(m) is torch.nn.Linear and not m.weight.requires_grad and min(m.in_features, m.out_features) >= MIN_FEATURES:
            n = m.weight.numel()
            full += n * weight_dtype.itemsize
            scales = m.out_features * 4 if kind in ("int8", "fp8") else n / 64 + n / 256 / 64 * 4  # nf4: double quant
            quant += n * BYTES_PER_WEIGHT[kind] + scales
    return full, quant


def prepare_denoiser(parts: Parts, s: Settings, weight_dtype: torch.dtype,
                     held: torch.dtype | None = None) -> torch.nn.Module:
    """A meta copy of the denoiser as the run holds it: its adapter (trained in fp32), frozen weights in `held`
    (the autocast dtype under mixed precision: train/precision.py), checkpointing."""
    model = torch.nn.Module.to(parts.denoiser(), weight_dtype)  # diffusers' own .to() warns about fp32 modules
    if s.adapter.enabled:
        apply_adapter(Components(model, torch.nn.Identity(), None, None, family=parts.family),
                      replace(s.adapter, text_encoder=False))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float() if s.adapter.enabled else p.data  # adapters train in fp32 whatever the base's
        elif held is not None and p.is_floating_point():
            p.data = p.data.to(held)
    if s.gradient_checkpointing and hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    return model


def _activations(parts: Parts, s: Settings, model: torch.nn.Module, autocast: torch.dtype | None,
                 cache: dict) -> float:
    """Traced at the run's batch (cached: the suggestions re-plan the same step with other settings). Not
    extrapolated from smaller batches: the peak moves (end of backward, where the gradients are, at a small batch;
    start of backward, where the activations are, at a large one), so it is not linear in the batch."""
    key = (id(parts), s.batch, s.resolution, s.precision, s.gradient_checkpointing, repr(s.adapter))
    if key not in cache:
        cache[key] = trace_step_bytes(copy.deepcopy(model), lambda: parts.inputs(s.batch, s.resolution), autocast)
    return float(cache[key])


def plan_memory(parts: Parts, s: Settings, gpu_memory_gb: float = 24.0, suggest: bool = True,
                _cache: dict | None = None) -> MemoryPlan:
    weight_dtype, autocast = DTYPES.get(str(s.precision), (torch.float32, None))
    if s.zero_stage and s.precision.endswith("mixed"):
        weight_dtype = autocast  # DeepSpeed keeps the model in the training precision and fp32 masters aside
    held = frozen_dtype(s.precision) or weight_dtype  # frozen weights under mixed precision (train/precision.py)
    model = prepare_denoiser(parts, s, weight_dtype, held)
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    n_trained = sum(p.numel() for p in trained)
    rows: dict[str, float] = {}
    host: dict[str, float] = {}
    notes: list[str] = []
    world = max(1, s.world_size)
    shard = world if s.zero_stage >= 2 else 1

    rows["trained weights"] = _nbytes(trained) / (world if s.zero_stage == 3 else 1)
    frozen_bytes = _nbytes(frozen, held) / (world if s.zero_stage == 3 else 1)  # ZeRO-3 partitions them too
    if s.quantize != "none":
        full, quant = _quantized_bytes(model, s.quantize, held)
        rows["frozen weights (not quantized)"] = frozen_bytes - full
        rows[f"frozen weights ({s.quantize})"] = quant
    else:
        rows[f"frozen weights ({str(held).split('.')[-1]})"] = frozen_bytes
    if s.block_swap:
        blocks = transformer_blocks(model)[-s.block_swap:]
        swapped = [_nbytes([p for p in b.parameters() if not p.requires_grad], held) for b in blocks]
        if s.quantize != "none":
            ratio = (rows[f"frozen weights ({s.quantize})"] + rows["frozen weights (not quantized)"]) / max(frozen_bytes, 1)
            swapped = [b * ratio for b in swapped]
        if s.device == "cuda":
            rows["block swap (weights moved to CPU)"] = -sum(swapped) + 2 * max(swapped)  # current + prefetched
            host["swapped blocks (pinned)"] = sum(swapped)
        else:
            notes.append("block swap saves nothing on a CPU device: the swapped weights stay in the same memory")
    if s.zero_stage and s.precision.endswith("mixed"):
        master = 4.0 * n_trained / world
        (host if s.offload_optimizer else rows)["fp32 master weights (ZeRO)"] = master
    opt = OPTIMIZER_BYTES.get(s.optimizer, 8) * n_trained / (world if s.zero_stage else 1)
    (host if s.offload_optimizer else rows)[f"optimizer state ({s.optimizer})"] = opt
    if s.ema:
        rows["EMA copy (fp32)"] = 4.0 * n_trained

    cache = _cache if _cache is not None else {}
    # the trace holds the gradients as backward makes them; ZeRO-2/3 keep only this rank's partition of them
    traced = _activations(parts, s, model, autocast, cache)
    grads = sum(p.numel() * p.element_size() for p in trained)
    rows[ACTIVATIONS] = traced - grads * (1 - 1 / shard)
    if s.quantize != "none":  # a quantized layer dequantizes its weight for the matmul: the largest one at a time
        largest = max((m.weight.numel() for m in model.modules() if type(m) is torch.nn.Linear), default=0)
        rows[ACTIVATIONS] += 2 * largest * (autocast or weight_dtype).itemsize

    if not s.cached:
        for i, enc in enumerate(parts.text_encoders):
            enc_bytes = _nbytes(enc.parameters(), held)
            if s.quantize != "none" and s.quantize_text_encoder:
                full, quant = _quantized_bytes(enc.requires_grad_(False), s.quantize, held)
                enc_bytes += quant - full
            rows[f"text encoder {i + 1} (frozen)" if len(parts.text_encoders) > 1 else "text encoder (frozen)"] = enc_bytes
        if parts.vae is not None:
            vae_dtype = torch.float32 if held == torch.float16 else held
            rows["VAE (frozen)"] = _nbytes(parts.vae.parameters(), vae_dtype)
    if s.device == "cuda":
        rows["overhead (CUDA context, allocator)"] = CUDA_OVERHEAD
    plan = MemoryPlan(rows, s, gpu_memory_gb, host, notes)
    if suggest and not plan.fits:
        plan.suggestions = cheapest_fixes(parts, s, gpu_memory_gb, cache)
    return plan


def candidate_fixes(s: Settings, n_blocks: int) -> list[tuple[str, dict[str, Any]]]:
    """Settings that cut memory, cheapest in speed and quality first; each builds on the ones before it."""
    out: list[tuple[str, dict[str, Any]]] = []
    if not s.gradient_checkpointing:
        out.append(("model.gradient_checkpointing=true", {"gradient_checkpointing": True}))
    if not s.cached:
        out.append(("cached latents and text (foundry-shards encode; then data.urls=<cache>)", {"cached": True}))
    if s.optimizer == "adamw":
        out.append(("optimizer.name=adamw8bit", {"optimizer": "adamw8bit"}))
    if s.adapter.enabled:
        for kind in ("int8", "nf4"):
            if BYTES_PER_WEIGHT.get(s.quantize) is None or BYTES_PER_WEIGHT[kind] < BYTES_PER_WEIGHT[s.quantize]:
                out.append((f"model.quantize={kind}", {"quantize": kind}))
        if not s.cached and not s.quantize_text_encoder:
            out.append(("model.quantize_text_encoder=true", {"quantize_text_encoder": True}))
    if n_blocks and s.device == "cuda":
        for n in sorted({max(1, n_blocks // 4), n_blocks // 2, (3 * n_blocks) // 4} - {0}):
            if n > s.block_swap:
                out.append((f"model.block_swap={n}", {"block_swap": n}))
    batch = s.batch
    while batch > 1:
        batch //= 2
        out.append((f"data.batch_size={batch} (raise trainer.accumulate_grad_batches to keep the global batch)",
                    {"batch": batch}))
    if s.zero_stage and not s.offload_optimizer:
        out.append(("strategy=deepspeed_stage2_offload", {"offload_optimizer": True}))
    return out


def cheapest_fixes(parts: Parts, s: Settings, gpu_memory_gb: float, cache: dict) -> list[tuple[str, float]]:
    """Settings taken in order (each kept when it lowers the peak) until the run fits: each step with the peak
    reached once it and the ones before it are set. Empty when nothing listed makes it fit."""
    n_blocks = len(transformer_blocks(parts.denoiser()))
    steps: list[tuple[str, float]] = []
    current, peak = s, plan_memory(parts, s, gpu_memory_gb, suggest=False, _cache=cache).peak
    for name, change in candidate_fixes(s, n_blocks):
        if "block_swap" in change and change["block_swap"] <= current.block_swap:
            continue
        trial = replace(current, **change)
        if trial.quantize_text_encoder and (trial.quantize == "none" or trial.cached):
            continue
        plan = plan_memory(parts, trial, gpu_memory_gb, suggest=False, _cache=cache)
        if plan.peak < 0.98 * peak:  # a step must buy something
            current, peak = trial, plan.peak
            setting = name.split("=")[0]  # a later value of a setting replaces the earlier (nf4 after int8)
            steps = [(n, b) for n, b in steps if n.split("=")[0] != setting] + [(name, peak)]
            if plan.fits:
                return steps
    return []
