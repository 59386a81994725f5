"""Adapters: only adapter weights train, the reference is the base with adapters off, and the files round-trip."""
import pytest
import torch
from safetensors.torch import load_file

from models.adapter_files import kohya_to_peft, peft_to_kohya, read_header, save_adapter, adapter_state
from models.adapters import AdapterSpec, adapters_disabled, apply_adapter, merge_adapters
from models.components import build_components
from train.build import build_module


def components(kind="lora", **kw):
    comps = build_components(preset="micro", resolution=16)
    apply_adapter(comps, AdapterSpec(kind=kind, rank=4, alpha=kw.pop("alpha", 8), **kw))
    return comps


def unet_out(comps, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 16, generator=g)
    ctx = torch.randn(2, 12, comps.text_encoder.config.hidden_size, generator=g)
    with torch.no_grad():
        return comps.unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample


def perturb(model):
    """Give the adapter non-zero weights (LoRA's B starts at zero, so a fresh adapter changes nothing)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_only_adapter_weights_train_and_disabling_gives_the_base(kind):
    comps = build_components(preset="micro", resolution=16)
    base = unet_out(comps)
    apply_adapter(comps, AdapterSpec(kind=kind, rank=4))
    trainable = {n for n, p in comps.unet.named_parameters() if p.requires_grad}
    assert trainable and all(any(tag in n for tag in ("lora_", "hada_", "lokr_")) for n in trainable)
    assert not any(p.requires_grad for p in comps.text_encoder.parameters())
    perturb(comps.unet)
    assert not torch.allclose(unet_out(comps), base, atol=1e-6)
    with adapters_disabled(comps.unet):
        assert torch.allclose(unet_out(comps), base, atol=1e-6)
    assert not torch.allclose(unet_out(comps), base, atol=1e-6)  # re-enabled after the block


def test_difffit_trains_biases_and_norm_scales_only():
    comps = components("difffit")
    trainable = [n for n, p in comps.unet.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".bias") or "norm" in n for n in trainable)
    n_train = sum(p.numel() for p in comps.unet.parameters() if p.requires_grad)
    assert n_train < 0.1 * sum(p.numel() for p in comps.unet.parameters())


def test_module_reference_is_the_base_without_a_copy(tiny_cfg):
    module = build_module(tiny_cfg("adapter=lora", "adapter.rank=2"))
    perturb(module.unet)
    module.require_reference()
    assert not module._reference_copy, "an adapter run must not copy the base"
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([100])
    ids = module.components.tokenizer(["a digit"], padding="max_length", max_length=12, return_tensors="pt").input_ids
    with module.reference() as ref:
        ref_out = ref.unet(x, t, encoder_hidden_states=ref.encode_text(ids)).sample
    with adapters_disabled(module.unet):
        base_out = module.unet(x, t, encoder_hidden_states=module.encode_text(ids)).sample
    assert torch.allclose(ref_out, base_out)
    assert not torch.allclose(module.unet(x, t, encoder_hidden_states=module.encode_text(ids)).sample, base_out)


def test_full_finetune_reference_is_a_frozen_copy_outside_the_module(tiny_cfg):
    module = build_module(tiny_cfg())
    module.require_reference()
    ref = module._reference_copy["unet"]
    assert ref is not module.unet and not any(p.requires_grad for p in ref.parameters())
    assert "_reference_copy" not in dict(module.named_children())
    assert sum(1 for _ in module.parameters()) == sum(1 for _ in build_module(tiny_cfg()).parameters())


def test_unknown_kind_and_missing_target_are_one_line_errors():
    with pytest.raises(ValueError, match="adapter.kind: 'lorax'"):
        AdapterSpec(kind="lorax")
    comps = build_components(preset="micro", resolution=16)
    with pytest.raises(ValueError, match=r"adapter.target: no module named \['nope'\]"):
        apply_adapter(comps, AdapterSpec(kind="lora", target=["nope"]))


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_kohya_file_round_trips(kind, tmp_path):
    comps = components(kind, text_encoder=True)
    perturb(comps.unet)
    state = adapter_state(comps.unet)
    kohya = peft_to_kohya(state, "lora_unet_", alpha=8.0)
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert all(float(v) == 8.0 for k, v in kohya.items() if k.endswith(".alpha"))
    back = kohya_to_peft(kohya, comps.unet, "lora_unet_")
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    written = save_adapter(comps, AdapterSpec(kind=kind, rank=4, alpha=8, text_encoder=True), tmp_path,
                           base_model="preset:micro", trigger="a sks digit")
    on_disk = load_file(str(written["kohya"]))
    assert any(k.startswith("lora_te_") for k in on_disk) and any(k.startswith("lora_unet_") for k in on_disk)
    meta = read_header(written["kohya"])
    assert meta["rank"] == 4 and meta["alpha"] == 8.0 and meta["trigger_prompt"] == "a sks digit"
    assert ("diffusers" in written) == (kind in ("lora", "dora"))


def test_merge_folds_the_adapter_into_plain_layers():
    comps = components("lora")
    perturb(comps.unet)
    adapted = unet_out(comps)
    merge_adapters(comps.unet)
    assert not any("lora" in n for n, _ in comps.unet.named_parameters())
    assert torch.allclose(unet_out(comps), adapted, atol=1e-5)
