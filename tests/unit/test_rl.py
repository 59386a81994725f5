"""Rewards, DDPO and reward backprop: hand-computed PPO objective, per-prompt advantages equal across 2 ranks and one
process, local-folder scorers on tiny random CLIP models, NaN rewards dropped and counted."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.methods.ddpo import ppo_loss
from train.rewards import (AestheticScore, Augmented, CLIPScore, DigitsLogProb, JpegSize, WeightedSum, digit_in_prompt,
                           per_prompt_advantages)


def test_ppo_clipped_objective_hand_computed():
    lp_old = torch.zeros(3)
    lp = torch.tensor([math.log(1.5), math.log(0.5), math.log(1.05)])
    adv = torch.tensor([1.0, 1.0, -2.0])
    out = ppo_loss(lp, lp_old, adv, clip_range=0.2)
    # r = 1.5, A = 1: max(-1.5, -1.2) = -1.2 ; r = 0.5, A = 1: max(-0.5, -0.8) = -0.5 ; r = 1.05, A = -2: 2.1
    assert torch.allclose(out["loss"], torch.tensor([-1.2, -0.5, 2.1]), atol=1e-6)
    assert out["clipfrac"].tolist() == [1.0, 1.0, 0.0]


def test_per_prompt_advantages_single_process():
    r = torch.tensor([1.0, 3.0, 10.0, 14.0, 7.0])
    p = torch.tensor([0, 0, 1, 1, 2])
    adv = per_prompt_advantages(r, p)
    assert torch.allclose(adv[:4], torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.allclose(adv[4], (7.0 - r.mean()) / r.std(unbiased=False), atol=1e-5)  # seen once: global stats


def _rank(rank, world, port, r, p, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def gather(t):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.stack(parts)

    half = len(r) // world
    mine = slice(rank * half, (rank + 1) * half)
    out[rank] = per_prompt_advantages(r[mine], p[mine], gather)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_per_prompt_advantages_across_two_ranks_equal_one_process():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(16, generator=g)
    p = torch.randint(0, 3, (16,), generator=g)
    out = mp.Manager().dict()
    port = 29500 + os.getpid() % 1000
    mp.spawn(_rank, args=(2, port, r, p, out), nprocs=2, join=True)
    assert torch.allclose(torch.cat([out[0], out[1]]), per_prompt_advantages(r, p), atol=1e-6)


def test_builtin_rewards():
    assert digit_in_prompt("a handwritten digit seven") == 7 and digit_in_prompt("a sks digit") is None
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    flat = torch.zeros(2, 3, 16, 16)
    comp, incomp = JpegSize(-1), JpegSize(1)
    assert (comp(flat, ["", ""]) > comp(images, ["", ""])).all(), "a flat image compresses better"
    assert torch.allclose(incomp(images, ["", ""]), -comp(images, ["", ""]))
    digits = DigitsLogProb()
    x = images.clone().requires_grad_(True)
    r = digits(x, ["a handwritten digit seven", "a sks digit"])
    assert torch.isfinite(r[0]) and torch.isnan(r[1])
    r[0].backward()
    assert x.grad.abs().sum() > 0
    both = WeightedSum([{"reward": digits, "weight": 2.0}, {"reward": incomp, "weight": 0.5}])
    assert not both.differentiable and both(images, ["one", "one"]).shape == (2,)


def test_augmented_reward_is_the_mean_over_its_shifted_copies_and_stays_differentiable():
    digits = DigitsLogProb()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    prompts = ["a handwritten digit seven", "a handwritten digit one", "a handwritten digit zero"]
    assert torch.allclose(Augmented(digits, max_shift=0, draws=3)(images, prompts), digits(images, prompts))
    aug = Augmented(digits, max_shift=2, draws=5, seed=1)
    x = images.clone().requires_grad_(True)
    r = aug(x, prompts)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
    by_hand = sum(digits(padded[..., dy:dy + 16, dx:dx + 16], prompts) for dy, dx in aug.last_offsets) / 5
    assert torch.allclose(r, by_hand, atol=1e-6)
    assert len(set(aug.last_offsets)) > 1 and not torch.allclose(r, digits(images, prompts))
    r.sum().backward()
    assert aug.differentiable and x.grad.abs().sum() > 0
    assert not Augmented(JpegSize(1)).differentiable
    with pytest.raises(ValueError, match="draws"):
        Augmented(digits, draws=0)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    from models.tiny import build_tokenizer, default_caption_corpus

    root = tmp_path_factory.mktemp("clip")
    tok = build_tokenizer(default_caption_corpus(), vocab_size=300, max_length=16)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(root / "pickscore")
    tok.save_pretrained(root / "pickscore")
    CLIPModel(cfg).save_pretrained(root / "aesthetic" / "clip")
    save_file({"layers.0.weight": torch.randn(4, 8), "layers.0.bias": torch.zeros(4),
               "layers.2.weight": torch.randn(1, 4), "layers.2.bias": torch.zeros(1)},
              str(root / "aesthetic" / "head.safetensors"))
    return root


def test_local_folder_scorers_are_differentiable(tiny_clip):
    images = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    for reward in (CLIPScore(str(tiny_clip / "pickscore")), AestheticScore(str(tiny_clip / "aesthetic"))):
        r = reward(images, ["a handwritten digit one", "a photo of a dog"])
        assert r.shape == (2,) and torch.isfinite(r).all()
        r.sum().backward()
    assert images.grad.abs().sum() > 0


def test_reward_folder_without_expected_files_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"reward.path: '.*empty' lacks config.json") as err:
        CLIPScore(str(tmp_path / "empty"))
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="lacks clip/config.json, head.safetensors"):
        AestheticScore(str(tmp_path / "empty"))


class NaNFor(DigitsLogProb):
    def __init__(self, bad):
        super().__init__()
        self.bad = bad

    def __call__(self, images, prompts):
        r = super().__call__(images, prompts)
        return torch.where(torch.arange(len(r)) < self.bad, torch.full_like(r, float("nan")), r)


@pytest.mark.parametrize("method", ["ddpo", "reward_backprop"])
def test_nan_rewards_are_dropped_and_all_nan_skips_the_step(tiny_cfg, method):
    from train.build import build_module

    overrides = [f"experiment={method}", "method.sample_steps=2"]
    if method == "ddpo":
        overrides += ["method.samples_per_prompt=2", "method.minibatch=4"]
    module = build_module(tiny_cfg(*overrides))
    ids = module.components.tokenizer(["a handwritten digit one", "a handwritten digit two"], padding="max_length",
                                      max_length=12, return_tensors="pt").input_ids
    batch = {"input_ids": ids, "captions": ["a handwritten digit one", "a handwritten digit two"]}
    module.method.reward = NaNFor(bad=1)
    module.noise_generator.manual_seed(0)
    out = module.method.loss(batch, module)
    assert torch.isfinite(out["loss"]).all() and out["reward_nonfinite"].item() == 1
    out["loss"].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.trainable_parameters())
    module.method.reward = NaNFor(bad=100)
    if method == "ddpo":
        module.method.units = []
    out = module.method.loss(batch, module)
    assert torch.isnan(out["loss"]).all()  # the loop's non-finite guard skips this step, weights untouched
    assert out["loss"].grad_fn is not None  # ...through the policy's graph, so every rank can still run backward


def test_every_ddpo_unit_has_a_policy_gradient_including_the_last_transition(tiny_cfg):
    """The final DDIM transition is stochastic too (it lands on alpha_cumprod[0], not 1), so whichever timestep a
    training unit draws, its PPO loss reaches the weights (a deterministic last step used to crash backward)."""
    from train.build import build_module

    module = build_module(tiny_cfg("experiment=ddpo", "method.sample_steps=3", "method.samples_per_prompt=2",
                                   "method.minibatch=4"))
    ids = module.components.tokenizer(["a handwritten digit one", "a handwritten digit two"], padding="max_length",
                                      max_length=12, return_tensors="pt").input_ids
    batch = {"input_ids": ids, "captions": ["a handwritten digit one", "a handwritten digit two"]}
    module.noise_generator.manual_seed(0)
    module.method.rollout(batch, module)
    assert sorted(j for _, j in module.method.units) == [0, 1, 2]
    while module.method.units:
        module.zero_grad()
        out = module.method.loss(batch, module)
        assert out["loss"].requires_grad
        out["loss"].sum().backward()


def test_reward_backprop_pretrain_regulariser_adds_the_denoising_loss(tiny_cfg):
    """ReFL's regulariser: with pretrain_weight=w the per-sample loss is -reward + w x the core's denoising loss on the
    batch's images (same noise draw), and a prompt-only batch is refused in one line."""
    from train.build import build_module

    captions = ["a handwritten digit one", "a handwritten digit two"]
    module = build_module(tiny_cfg("experiment=reward_backprop", "method.sample_steps=2",
                                   "method.pretrain_weight=0.5"))
    ids = module.components.tokenizer(captions, padding="max_length", max_length=12, return_tensors="pt").input_ids
    size = module.components.sample_size
    batch = {"input_ids": ids, "captions": captions, "pixels": torch.rand(2, 3, size, size) * 2 - 1}
    module.noise_generator.manual_seed(0)
    with_reg = module.method.loss(batch, module)
    module.method.pretrain_weight = 0.0
    module.noise_generator.manual_seed(0)
    without = module.method.loss(batch, module)
    assert torch.allclose(with_reg["reward_mean"], without["reward_mean"])
    extra = (with_reg["loss"] - without["loss"]).detach()
    assert extra.shape == (2,)
    assert extra.min() > 0 and torch.allclose(extra.mean(), 0.5 * with_reg["pretrain_loss"], rtol=1e-5)
    module.method.pretrain_weight = 0.5
    with pytest.raises(ValueError, match="method.pretrain_weight > 0 needs images") as err:
        module.method.loss({"input_ids": ids, "captions": captions}, module)
    assert "\n" not in str(err.value)


def test_reward_backprop_defaults_to_the_whole_chain_and_refuses_a_k_beyond_it(tiny_cfg):
    from train.build import build_module

    assert build_module(tiny_cfg("experiment=reward_backprop", "method.sample_steps=3")).method.grad_last == 3
    assert build_module(tiny_cfg("experiment=reward_backprop", "method.sample_steps=3",
                                 "method.grad_last=1")).method.grad_last == 1
    with pytest.raises(Exception, match="method.grad_last=4: expected 1..sample_steps"):  # hydra wraps it
        build_module(tiny_cfg("experiment=reward_backprop", "method.sample_steps=3", "method.grad_last=4"))


def test_ddpo_rollout_count_matches_steps_per_rollout(tiny_cfg):
    """What the README's DDPO row reports: optimizer steps / steps_per_rollout rollouts (here 8 trajectories in
    minibatches of 4, each trained on 2 timesteps accumulated into one step: 2 steps per rollout)."""
    import lightning as L

    from train.build import build_module

    module = build_module(tiny_cfg("experiment=ddpo", "method.sample_steps=4", "method.timestep_fraction=0.5",
                                   "method.samples_per_prompt=2", "method.minibatch=4"))
    captions = [f"a handwritten digit {w}" for w in ("one", "two", "three", "four")]
    ids = module.components.tokenizer(captions, padding="max_length", max_length=12, return_tensors="pt").input_ids
    data = [{"input_ids": ids, "captions": captions}] * 8
    trainer = L.Trainer(max_steps=4, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert module.method.steps_per_rollout(len(captions)) == 2
    assert trainer.global_step == 4 and module.method.rollouts == 4 // 2


def test_ddpo_resumes_mid_rollout_on_the_same_transitions(tiny_cfg):
    """The stored rollout and its remaining units go through a (weights-only) checkpoint: the resumed method's next
    loss is the uninterrupted one's, not a fresh rollout's."""
    import io

    from train.build import build_module

    overrides = ("experiment=ddpo", "method.sample_steps=3", "method.samples_per_prompt=2", "method.minibatch=2")
    module = build_module(tiny_cfg(*overrides))
    captions = ["a handwritten digit one", "a handwritten digit two"]
    ids = module.components.tokenizer(captions, padding="max_length", max_length=12, return_tensors="pt").input_ids
    batch = {"input_ids": ids, "captions": captions}
    module.noise_generator.manual_seed(0)
    module.method.loss(batch, module)  # rollout + first unit
    buf = io.BytesIO()
    torch.save(module.method.state_dict(module), buf)
    buf.seek(0)
    resumed = build_module(tiny_cfg(*overrides))
    resumed.unet.load_state_dict(module.unet.state_dict())
    resumed.method.load_state_dict(torch.load(buf, weights_only=True), resumed)
    assert resumed.method.rollouts == 1 and len(resumed.method.units) == len(module.method.units) > 0
    expect, got = module.method.loss(batch, module), resumed.method.loss(batch, resumed)
    torch.testing.assert_close(got["loss"], expect["loss"])
