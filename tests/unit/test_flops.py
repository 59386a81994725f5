"""The layer-shape FLOP count against torch's own counter, and MFU in the throughput callback."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.components import build_components
from models.flops import backbone_inputs, forward_flops, peak_tflops, train_flops_per_sample


@pytest.mark.parametrize("preset", ["micro", "tiny_pixel", "dit_micro", "dit_tiny", "mmdit_micro", "mmdit_tiny"])
def test_count_matches_torch_flop_counter_within_10_percent(preset):
    comps = build_components(preset=preset, resolution=16)
    args, kwargs = backbone_inputs(comps, batch=2)
    ours = forward_flops(comps.unet, *args, **kwargs)
    # the math attention path: torch's counter has no formula for the fused CPU kernel, but counts its matmuls
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        comps.unet(*args, **kwargs)
    theirs = counter.get_total_flops()
    assert theirs > 0 and abs(ours - theirs) / theirs < 0.10, (preset, ours, theirs)
    assert train_flops_per_sample(comps) == pytest.approx(3 * ours / 2, rel=1e-6)  # per sample, fwd + bwd


def test_peak_is_known_only_where_it_can_be():
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), override=100.0) == 100.0
