"""A sharded checkpoint whose files carry a pickled object (here one whose `__reduce__` opens a file) is refused by
every loading path, before anything is unpickled: export, sampling, evaluation, `model.pretrained=<run dir>`,
`foundry-shards encode --model`, `--consolidate` and resume. A real DeepSpeed shard passes the same scan."""
import json

import pytest
import torch

from train import build
from train import checkpoint as ck


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


@pytest.fixture
def evil_run(tmp_path):
    marker = tmp_path / "pwned"
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    (last / "checkpoint").mkdir(parents=True)
    (last / "latest").write_text("checkpoint")
    (last / "foundry.json").write_text(json.dumps({"format": "deepspeed", "zero_stage": 2, "global_step": 1}))
    torch.save({"module": {"unet.w": torch.zeros(2)}, "x": Payload(str(marker))},
               last / "checkpoint" / "mp_rank_00_model_states.pt")
    return tmp_path / "run", last, marker


def _paths(run, last):
    from train.build import build_module
    from tests.conftest import compose
    from train.encode import encode_shards

    return {
        "export/eval (load_module)": lambda: build.load_module(ck.find_checkpoint(run)),
        "sample/eval/couplings (load_pipeline)": lambda: build.load_pipeline(run),
        "export --consolidate": lambda: ck.write_consolidated(last, run / "one.ckpt"),
        "resume ckpt_path=last": lambda: ck.resolve_ckpt_path("last", run),
        "resume ckpt_path=<folder>": lambda: ck.resolve_ckpt_path(str(last), run),
        "model.pretrained=<run dir>": lambda: build_module(compose([f"model.pretrained={run}"])),
        "foundry-shards encode --model": lambda: encode_shards([], run / "enc", model=str(run)),
    }


@pytest.mark.parametrize("path", ["export/eval (load_module)", "sample/eval/couplings (load_pipeline)",
                                  "export --consolidate", "resume ckpt_path=last", "resume ckpt_path=<folder>",
                                  "model.pretrained=<run dir>", "foundry-shards encode --model"])
def test_every_loading_path_refuses_a_pickled_object(evil_run, path):
    run, last, marker = evil_run
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states\.pt' carries pickled object\(s\) io\.open"):
        _paths(run, last)[path]()
    assert not marker.exists(), "the payload ran"


def test_deepspeeds_own_bookkeeping_classes_pass_the_scan(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    (tmp_path / "checkpoint").mkdir()
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients, "w": torch.ones(2)},
               tmp_path / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    ck.check_shard_files(tmp_path)  # no error
