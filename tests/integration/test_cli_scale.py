"""Scale-out through the real CLI on CPU: DeepSpeed ZeRO-2/3 (2 ranks, gloo), a 2-node torchrun simulation on
loopback, sharded checkpoints that resume and consolidate into a diffusers export matching an unsharded twin."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import cli, small
from tests.helpers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.distributed]

TWO_RANKS = ["trainer.accelerator=cpu", "trainer.devices=2", "logger=csv", "callbacks=none", "data.batch_size=4",
             "checkpoint.every_n_steps=3"]


def run(args, env=None, timeout=600):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **(env or {})}
    env.pop("FOUNDRY_RUN_NAME", None)
    res = subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    return res.stdout + res.stderr


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all tensors. Not the max: where a gradient is ~0, Adam's g / (sqrt(v) + eps) turns
    reduction-order rounding into updates of up to one learning rate, on a fraction of a percent of the weights
    (measured: median difference 0, 0.7% of elements above 1e-5, relative difference 7e-5 after 4 steps)."""
    diff = torch.cat([(a[k].float() - b[k].float()).flatten() for k in b])
    return float(diff.norm() / torch.cat([b[k].float().flatten() for k in b]).norm())


def images(path, seed=0):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), trust_remote_code=True)
    out = pipe(["a handwritten digit three", "a handwritten digit five"], num_inference_steps=4, guidance_scale=2.0,
               generator=[torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)],
               output_type="np").images
    return np.asarray(out)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_trains_resumes_and_exports_from_sharded_checkpoint(tmp_path, stage):
    base = small(f"paths.output_dir={tmp_path}", "run_name=ds", f"strategy=deepspeed_stage{stage}", *TWO_RANKS,
                 "trainer.max_steps=3")
    run(base)
    last = tmp_path / "ds" / "checkpoints" / "last.ckpt"
    assert last.is_dir(), "a DeepSpeed checkpoint is a folder of per-rank shards"
    meta = json.loads((last / "foundry.json").read_text())
    assert meta == {**meta, "format": "deepspeed", "zero_stage": stage, "world_size": 2, "global_step": 3}
    assert not list(last.parent.glob("*.tmp")), "no half-written checkpoint folder is left behind"
    out = run([*base[:-1], "trainer.max_steps=5"])
    assert "at step 3" in out, "the relaunch must resume the sharded checkpoint"
    assert json.loads((tmp_path / "ds" / "summary.json").read_text())["global_step"] == 5
    res = subprocess.run([sys.executable, "-m", "train.ops.export", str(tmp_path / "ds"), str(tmp_path / "export"),
                          "--consolidate", str(tmp_path / "one.ckpt")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert images(tmp_path / "export").shape == (2, 16, 16, 3)
    single = torch.load(tmp_path / "one.ckpt", map_location="cpu", weights_only=True)  # plain tensors now
    assert single["global_step"] == 5 and any(k.startswith("unet.") for k in single["state_dict"])
    assert not any(k.startswith("text_encoder.") for k in single["state_dict"]), "frozen weights are never saved"


def test_zero3_export_matches_the_unsharded_twin(tmp_path):
    """ZeRO-3 and DDP on the same 2 ranks see the same data and noise, so after identical training the consolidated
    ZeRO-3 weights and the DDP weights agree, and so do their exported pipelines' images for the same seed."""
    common = ["trainer.max_steps=4", "module.max_nonfinite_steps=5", *TWO_RANKS, "callbacks=default",
              "callbacks.sample_images.every_n_steps=0", "callbacks.digits_eval.enabled=false"]
    for name, strategy in (("z3", "deepspeed_stage3"), ("ddp", "ddp")):
        run(small(f"paths.output_dir={tmp_path}", f"run_name={name}", f"strategy={strategy}", *common))
        subprocess.run([sys.executable, "-m", "train.ops.export", str(tmp_path / name), str(tmp_path / f"{name}-export")],
                       check=True, capture_output=True, timeout=300)
    from safetensors.torch import load_file

    z3 = load_file(tmp_path / "z3-export" / "unet" / "diffusion_pytorch_model.safetensors")
    ddp = load_file(tmp_path / "ddp-export" / "unet" / "diffusion_pytorch_model.safetensors")
    assert z3.keys() == ddp.keys()
    assert relative_difference(z3, ddp) < 1e-4, "ZeRO-3 and DDP weights differ"
    np.testing.assert_allclose(images(tmp_path / "z3-export"), images(tmp_path / "ddp-export"), atol=2e-3)


def test_two_node_torchrun_simulation_on_loopback(tmp_path):
    """Two torchrun invocations (node ranks 0 and 1, one process each) form one 2-node job through the real CLI."""
    port = free_port()
    args = small(f"paths.output_dir={tmp_path}", "run_name=nodes", "trainer.accelerator=cpu", "trainer.devices=1",
                 "trainer.num_nodes=2", "strategy=ddp", "logger=csv", "callbacks=none", "trainer.max_steps=3")
    env = {**os.environ}
    env.pop("FOUNDRY_RUN_NAME", None)
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "-m", "train.ops.main", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for rank in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(o[-3000:] for o in outs)
    summary = json.loads((tmp_path / "nodes" / "summary.json").read_text())
    assert summary["global_step"] == 3
    assert "world_size=2" in "".join(outs) or "MEMBER: 2/2" in "".join(outs)


def test_ddp_matches_a_single_process_on_the_same_global_batch(tmp_path):
    """2 DDP ranks x 4 samples vs 1 process x 8 samples, same samples, noise and timesteps: the same losses and
    weights after 4 optimizer steps (our module and loop, under torchrun)."""
    twin = os.path.join(os.path.dirname(__file__), "ddp_twin.py")
    env = {**os.environ}
    env.pop("FOUNDRY_RUN_NAME", None)
    for n in (1, 2):
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                              "--master_port", str(free_port()), twin, str(tmp_path / f"world{n}.pt")],
                             capture_output=True, text=True, timeout=600, env=env)
        assert res.returncode == 0, res.stderr[-4000:]
    one, two = (torch.load(tmp_path / f"world{n}.pt", weights_only=True) for n in (1, 2))
    assert len(one["losses"]) == len(two["losses"]) == 4
    np.testing.assert_allclose(one["losses"], two["losses"], rtol=1e-4)
    assert relative_difference(one["weights"], two["weights"]) < 1e-4


def test_lora_under_zero3_saves_only_the_adapter_and_exports_it(tmp_path):
    """The peers' ZeRO-3 LoRA failure: the adapter must be gathered from the shards and the frozen base left out."""
    run(small(f"paths.output_dir={tmp_path}", "run_name=lora3", "strategy=deepspeed_stage3", "adapter=lora",
              "adapter.rank=4", *TWO_RANKS, "trainer.max_steps=2", "optimizer.lr=1e-3"))
    last = tmp_path / "lora3" / "checkpoints" / "last.ckpt"
    single = tmp_path / "one.ckpt"
    res = subprocess.run([sys.executable, "-m", "train.ops.export", str(tmp_path / "lora3"), str(tmp_path / "lora"),
                          "--consolidate", str(single)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    state = torch.load(single, map_location="cpu", weights_only=True)["state_dict"]
    assert state and all("lora_" in k for k in state), "only adapter weights are saved under ZeRO-3"
    from safetensors.torch import load_file

    lora = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert lora and any(float(v.abs().sum()) > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k), \
        "the exported adapter holds the trained (gathered) weights, not empty ZeRO-3 placeholders"
    assert last.is_dir()
