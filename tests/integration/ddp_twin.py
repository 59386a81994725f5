"""Worker for test_ddp_matches_single_process: our module and loop under torchrun with 1 or 2 processes.

Every global batch is fixed (digits, with their noise and timesteps drawn up front); rank r trains on its slice.
Rank 0 writes the all-reduced loss of every step and the final weights, so the test can compare world sizes.

    torchrun --nproc_per_node N tests/integration/ddp_twin.py OUT.pt
"""
import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import compose  # noqa: E402
from train.build import build_module  # noqa: E402
from train.methods.base import Method  # noqa: E402

GLOBAL_BATCH, STEPS = 8, 4


class GivenDraws(Method):
    """Denoising whose noise and timesteps come with the batch, so they do not depend on the rank layout."""

    name = "given_draws"

    def loss(self, batch, module):
        core = module.core
        d = core.noised(batch["pixels"], t=batch["t"], noise=batch["noise"])
        pred = module.unet(d.x_t, d.t, encoder_hidden_states=module.encode_text(batch["input_ids"])).sample
        return {"loss": core.per_sample_loss(pred, d.target, d.t)}


class RecordLoss(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach().clone()
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        self.losses.append(float(loss))


def global_batches(tokenizer):
    from sklearn.datasets import load_digits

    g = torch.Generator().manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images[: GLOBAL_BATCH * STEPS], dtype=torch.float32) / 8 - 1
    x = torch.nn.functional.interpolate(x[:, None], size=16).repeat(1, 3, 1, 1)
    ids = tokenizer([f"a handwritten digit {d}" for d in digits.target[: GLOBAL_BATCH * STEPS]], padding="max_length",
                    max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    noise, t = torch.randn(x.shape, generator=g), torch.randint(0, 1000, (len(x),), generator=g)
    return [{k: v[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH] for k, v in
             {"pixels": x, "input_ids": ids, "noise": noise, "t": t}.items()} for i in range(STEPS)]


def main(out: str) -> None:
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    module = build_module(compose(["lr_scheduler.warmup_steps=0", "optimizer.lr=1e-3"]))
    module.method = GivenDraws()
    per = GLOBAL_BATCH // world
    data = [{k: v[rank * per:(rank + 1) * per] for k, v in b.items()} for b in global_batches(module.components.tokenizer)]
    record = RecordLoss()
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_steps=STEPS,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[record], gradient_clip_val=1.0,
                        use_distributed_sampler=False)  # the slices above are the split
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    if trainer.is_global_zero:
        torch.save({"losses": record.losses, "weights": {k: v.detach().clone() for k, v in module.unet.state_dict().items()}},
                   out)


if __name__ == "__main__":
    main(sys.argv[1])
