"""Bad configuration is rejected before any heavy work, with one line naming the key."""
import pytest

from tests.conftest import compose
from train.ops.validate import ConfigError, validate


def test_the_default_and_test_configs_are_valid():
    validate(compose([]))


@pytest.mark.parametrize("override, key", [
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("trainer.max_steps=ten", "trainer.max_steps"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("data.batch_size=-4", "data.batch_size"),
    ("data.caption_dropout=1.5", "data.caption_dropout"),
    ("optimizer.lr=0", "optimizer.lr"),
    ("checkpoint.every_n_steps=0", "checkpoint.every_n_steps"),
    ("data.steps_per_epoch=null", "data.resampled=true needs data.steps_per_epoch"),
    ("run_name=a/b", "run_name"),
    ("adapter=lora model.train_text_encoder=true", "model.train_text_encoder=true with adapter.kind=lora"),
    ("method=dpo", "method=dpo needs preference pairs but data.kind=image"),
    ("data=preference data.urls=/x", "data.kind=pair (preference pairs) only feeds method=dpo"),
    ("experiment=ddpo trainer.accumulate_grad_batches=4", "trainer.accumulate_grad_batches=4 must equal"),
    ("trainer.precision=16-mixed trainer.accelerator=cpu", "trainer.precision=16-mixed on trainer.accelerator=cpu"),
    ("experiment=lcm", "method.teacher: required but not set"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        validate(compose(override.split()))
    message = str(err.value)
    assert key in message and "\n" not in message


def test_a_run_shorter_than_its_warmup_warms_up_over_a_tenth_of_it():
    from train.ops.validate import fit_short_run

    cfg = compose(["trainer.max_steps=10", "lr_scheduler.warmup_steps=100"])
    note = fit_short_run(cfg)
    assert cfg.lr_scheduler.warmup_steps == 1 and "warming up over 1 step(s)" in note and "\n" not in note
    validate(cfg)
    assert fit_short_run(compose(["trainer.max_steps=200", "lr_scheduler.warmup_steps=100"])) is None
    assert "no warmup instead" in fit_short_run(compose(["trainer.max_steps=4", "lr_scheduler.warmup_steps=100"]))


@pytest.mark.parametrize("experiment, command", [
    *[(e, "foundry-train run_name=teacher") for e in ("lcm", "lcm_lora", "progressive", "guidance_distill", "vsd",
                                                      "dmd2")],
    ("dpo", "benchmarks/dpo_digits.py --base RUN"),
    ("reflow", "foundry-"),
])
def test_an_experiment_without_its_teacher_or_data_names_the_command_that_makes_it(experiment, command):
    with pytest.raises(ConfigError) as err:
        validate(compose([f"experiment={experiment}"]))
    message = str(err.value)
    assert "required but not set" in message and command in message and "\n" not in message
