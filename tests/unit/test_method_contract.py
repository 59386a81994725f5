"""The contract every training method keeps (train/methods/base.py), checked for each config in conf/method/.

Each method is built through the real config on the micro model, given a tiny batch in the shape its data contract
expects, and must: return {"loss": [B], ...tensors} with a finite, differentiable loss; send gradients only into the
module's trainable parameters (at least one of them non-zero) and none into a frozen network (the encoders held
outside the tree, the reference, a method's own target or reward); and hand its state through a checkpoint (the
`weights_only=True` load every checkpoint read uses) to a freshly built module, which reports the same state back.
Every hook gets `module.view` (train/methods/base.py's `MethodView`), so a method touching a member of the module
outside `METHOD_INTERFACE` (the Trainer, Lightning internals) fails here. A method config without a case below fails
`test_every_method_config_has_a_contract_case`.
"""
from __future__ import annotations

import inspect
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from threadpoolctl import threadpool_limits  # sklearn's dependency: limits the BLAS and OpenMP pools

from models.components import build_components
from models.export import export_pipeline
from train.build import build_module

CONF_METHODS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "method").glob("*.yaml"))
CAPTIONS = ["a handwritten digit one", "a handwritten digit two"]
TEACHER = "{teacher}"  # replaced by the module-scoped teacher folder


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Micro-model tensors gain nothing from thread pools, and on a busy 2-core box their contention made this file
    several times slower (torch's pool: 80 s against 21 s; numpy's BLAS, which trains the digits judge DDPO's and
    reward backprop's reward needs once per session: 28 s against 4 s). Both are restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """One frozen micro teacher for every distillation case (an exported diffusers folder, like `foundry-export`)."""
    return export_pipeline(build_components(preset="micro", resolution=16), tmp_path_factory.mktemp("teacher") / "t")


# ----- batches, in the shape each data contract delivers -----
def _ids(module, captions: list[str]) -> torch.Tensor:
    return module.components.tokenizer(captions, padding="max_length", max_length=12, return_tensors="pt").input_ids


def _pixels(module, n: int) -> torch.Tensor:
    size = module.components.sample_size
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n)) * 2 - 1


def image_batch(module) -> dict[str, Any]:
    """Caption/image shards (data=digits): pixels in [-1, 1], token ids, captions."""
    return {"pixels": _pixels(module, 2), "input_ids": _ids(module, CAPTIONS), "captions": list(CAPTIONS)}


def dreambooth_batch(module) -> dict[str, Any]:
    """data=dreambooth: instance images first, then as many class images, marked by `is_prior`."""
    captions = ["a sks digit", "a sks digit", "a digit", "a digit"]
    return {"pixels": _pixels(module, 4), "input_ids": _ids(module, captions), "captions": captions,
            "is_prior": torch.tensor([False, False, True, True])}


def pair_batch(module) -> dict[str, Any]:
    """data=preference (kind=pair): winners in `pixels`, losers in `pixels_lose`; B = pairs."""
    return {**image_batch(module), "pixels_lose": _pixels(module, 2).flip(0)}


def prompt_batch(module) -> dict[str, Any]:
    """Prompt-only batches (RL, VSD): token ids and the captions a reward reads."""
    return {"input_ids": _ids(module, CAPTIONS), "captions": list(CAPTIONS)}


def coupling_batch(module) -> dict[str, Any]:
    """data.kind=coupling (`foundry-shards couplings`): the teacher's noise and its output x0 for it."""
    g = torch.Generator().manual_seed(1)
    size = module.components.sample_size
    return {"x0": _pixels(module, 2), "noise": torch.randn(2, 3, size, size, generator=g),
            "input_ids": _ids(module, CAPTIONS), "captions": list(CAPTIONS)}


# ----- moving a method's state away from the fresh one, so the round trip carries something -----
@torch.no_grad()
def _sgd_step(module) -> None:
    """What an optimizer step does to the trained weights (sign-SGD: every tensor with a gradient moves)."""
    for p in module.trainable_parameters():
        if p.grad is not None:
            p.add_(p.grad.sign(), alpha=-1e-2)


def advance_spin(module) -> None:
    """As `on_step_end` at step `steps_per_iteration`: iteration 1, the opponent is now the trained weights."""
    _sgd_step(module)
    module.method.iteration = 1
    module.refresh_reference()


def advance_progressive(module) -> None:
    """As `on_step_end` at step `steps_per_round`: round 1, this round's student is the next teacher."""
    _sgd_step(module)
    module.method.round = 1
    module.refresh_reference()


def advance_lcm(module) -> None:
    """An optimizer step, then the method's own hook: the EMA target moves toward the student."""
    _sgd_step(module)
    module.method.on_step_end(module.view)


@dataclass
class Case:
    overrides: list[str]
    batch: Callable[[Any], dict[str, Any]]
    samples: int                                # B: the length the per-sample loss must have
    advance: Callable[[Any], None] | None = None
    state_keys: set[str] = field(default_factory=set)  # keys the advanced state must hold


CASES: dict[str, Case] = {
    "denoise": Case(["method=denoise"], image_batch, 2),
    "dreambooth": Case(["experiment=dreambooth"], dreambooth_batch, 4),
    "dpo": Case(["experiment=dpo", "data.urls=unused"], pair_batch, 2),
    "erase": Case(["experiment=erase", "method.concept=a handwritten digit seven", "method.sample_steps=2",
                   "method.preserve=[a handwritten digit one]"], image_batch, 2),
    "spin": Case(["experiment=spin", "method.sample_steps=2"], image_batch, 2, advance_spin, {"iteration", "opponent"}),
    # 2 prompts x samples_per_prompt 2 = 4 trajectories; one training unit is a minibatch of them
    "ddpo": Case(["experiment=ddpo", "method.sample_steps=2", "method.samples_per_prompt=2", "method.minibatch=4"],
                 prompt_batch, 4),
    "grpo": Case(["experiment=grpo", "model=dit_tiny", "model.preset=dit_micro", "method.sample_steps=2",
                  "method.group_size=2", "method.minibatch=4"], prompt_batch, 4),
    "reward_backprop": Case(["experiment=reward_backprop", "method.sample_steps=2"], prompt_batch, 2),
    "lcm": Case(["experiment=lcm", f"method.teacher={TEACHER}", "model.guidance_embedding=32"], image_batch, 2,
                advance_lcm, {"target"}),
    "guidance_distill": Case(["experiment=guidance_distill", f"method.teacher={TEACHER}",
                              "model.guidance_embedding=32"], image_batch, 2),
    "progressive": Case(["experiment=progressive", f"method.teacher={TEACHER}", "model.prediction_type=v_prediction"],
                        image_batch, 2, advance_progressive, {"round", "teacher"}),
    "reflow": Case(["experiment=reflow", f"method.teacher={TEACHER}", "data.urls=unused"], coupling_batch, 2),
    "vsd": Case(["experiment=vsd", f"method.teacher={TEACHER}", "method.fake_rank=2"], prompt_batch, 2),
    "dmd2": Case(["experiment=dmd2", f"method.teacher={TEACHER}", "method.gan_weight=0.1", "method.fake_updates=1"],
                 image_batch, 2),
}
XFAIL: dict[str, str] = {}  # method -> the precise reason it cannot keep the contract today (strict)


def _params(case_id: str):
    return pytest.param(case_id, id=case_id, marks=[pytest.mark.xfail(strict=True, reason=XFAIL[case_id])]
                        if case_id in XFAIL else [])


def test_every_method_config_has_a_contract_case():
    assert CONF_METHODS, "no conf/method/*.yaml found"
    assert set(CONF_METHODS) == set(CASES), (f"conf/method/ and this file disagree: add a Case for "
                                             f"{sorted(set(CONF_METHODS) - set(CASES))}, drop "
                                             f"{sorted(set(CASES) - set(CONF_METHODS))}")


# ----- the frozen networks a method can reach -----
def _leaves(obj: Any, depth: int = 3) -> list[torch.Tensor]:
    """Leaf tensors reachable from `obj` (modules' parameters and buffers, tensors in attributes, dicts, lists)."""
    if isinstance(obj, torch.nn.Module):
        return [*obj.parameters(), *obj.buffers()]
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_leaf else []
    if depth == 0 or isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return []
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and not inspect.isroutine(obj):
        items = list(vars(obj).values())  # a reward, a judge: plain objects holding networks or weight tensors
    else:
        return []
    return [t for item in items for t in _leaves(item, depth - 1)]


def frozen_tensors(module) -> dict[str, list[torch.Tensor]]:
    """By owner: the encoders held outside the tree, the reference (`module.reference()`), and whatever the method
    keeps beside the module (LCM's target network, a reward's judge or scorer)."""
    out = {name: [*m.parameters()] for name, m in module.frozen_models().items()}
    try:
        with module.reference() as ref:
            out["reference.unet"] = [*ref.unet.parameters()]
            out["reference.text_encoder"] = [*ref.text_encoder.parameters()]
    except RuntimeError:  # this method asked for no reference
        pass
    in_tree = {id(p) for p in module.parameters()}
    for attr, value in vars(module.method).items():
        tensors = [t for t in _leaves(value) if id(t) not in in_tree]
        if tensors:
            out[f"method.{attr}"] = tensors
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _through_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """The method state as a resumed run gets it: saved in the checkpoint, read back with `weights_only=True`."""
    buf = io.BytesIO()
    torch.save({"foundry": {"method": state}}, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=True)["foundry"]["method"]


@pytest.mark.parametrize("name", [_params(n) for n in sorted(CASES)])
def test_method_keeps_the_contract(name, tiny_cfg, teacher):
    case = CASES[name]
    overrides = [o.replace(TEACHER, str(teacher)) for o in case.overrides]
    module = build_module(tiny_cfg(*overrides))
    method = module.method
    assert method.name == name

    # 1. loss: {"loss": [B] finite with a graph, every other value a tensor}
    batch = case.batch(module)
    module.noise_generator.manual_seed(0)
    out = method.loss(batch, module.view)  # the restricted view the loop hands it: only METHOD_INTERFACE
    assert isinstance(out, dict) and "loss" in out, f"{name}: loss() must return a dict with 'loss'"
    loss = out["loss"]
    assert isinstance(loss, torch.Tensor) and loss.shape == (case.samples,), \
        f"{name}: loss must be [B={case.samples}], got {getattr(loss, 'shape', type(loss))}"
    assert loss.is_floating_point() and torch.isfinite(loss).all(), f"{name}: non-finite loss {loss}"
    assert loss.grad_fn is not None, f"{name}: the loss carries no autograd graph"
    not_tensors = {k: type(v).__name__ for k, v in out.items() if not isinstance(v, torch.Tensor)}
    assert not not_tensors, f"{name}: non-tensor values {not_tensors} (the module logs value.float().mean())"

    # 2. gradients: only into trainable parameters, none into frozen networks
    trainable = module.trainable_parameters()
    assert trainable, f"{name}: nothing trains"
    trainable_ids = {id(p) for p in trainable}
    frozen = frozen_tensors(module)
    early = sum(p.grad is not None for p in [*module.parameters(), *(t for ts in frozen.values() for t in ts)])
    assert early == 0, f"{name}: {early} tensor(s) hold a gradient before backward"
    loss.mean().backward()
    named = dict(module.named_parameters())
    for n, p in named.items():
        if p.grad is not None:
            assert p.requires_grad and id(p) in trainable_ids, f"{name}: '{n}' got a gradient but does not train"
    moved = [n for n, p in named.items() if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    assert moved, f"{name}: no trainable parameter got a non-zero gradient"
    for owner, tensors in frozen_tensors(module).items():  # again: the loss may have filled buffers
        leaked = sum(id(t) not in trainable_ids and (t.requires_grad or t.grad is not None) for t in tensors)
        assert leaked == 0, f"{name}: {leaked} tensor(s) of frozen '{owner}' require or got a gradient"

    # 3. state: through a checkpoint into a freshly built module, reported back unchanged
    if case.advance is not None:
        case.advance(module)
    state = method.state_dict(module.view)
    assert isinstance(state, dict) and case.state_keys <= state.keys(), \
        f"{name}: state {sorted(state)} lacks {sorted(case.state_keys - state.keys())}"
    module2 = build_module(tiny_cfg(*overrides))
    method2 = module2.method
    fresh = method2.state_dict(module2.view)
    if case.advance is not None:
        moved_on = not _same(fresh, state)
        assert moved_on, f"{name}: the advanced state equals a fresh one; the round trip proves nothing"
    method2.load_state_dict(_through_checkpoint(state), module2.view)
    back = method2.state_dict(module2.view)
    assert back.keys() == state.keys(), f"{name}: state keys {sorted(state)} came back as {sorted(back)}"
    kept = _same(back, state)
    assert kept, f"{name}: the state changed on its way through a checkpoint"


def test_the_method_view_refuses_what_is_not_in_the_interface(tiny_cfg):
    module = build_module(tiny_cfg())
    view = module.view
    assert view.unet is module.unet and view.world_size == 1 and view.method_name == "denoise"
    for lightning_internal in ("trainer", "all_gather", "add_module", "log", "optimizers"):
        with pytest.raises(AttributeError, match="METHOD_INTERFACE"):
            getattr(view, lightning_internal)
    with pytest.raises(AttributeError, match="cannot set"):
        view.unet = None
