"""The console a person reads (foundry-train, foundry-eval): library notes nobody here can act on are dropped, each
listed below with the reason, before any of those libraries speaks; everything else still shows.

`install()` is idempotent and touches only the named messages: a new warning from a library still reaches the user.
"""
from __future__ import annotations

import logging
import re
import warnings

# (message pattern, why it is dropped)
QUIET_WARNINGS = (
    (r"You passed in a `val_dataloader` but have no `validation_step`",
     "our evaluation runs in callbacks (callbacks/eval_digits.py), not Lightning's validation loop"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "inside Lightning; nothing to change on our side"),
    (r"Your `IterableDataset` has `__len__` defined",
     "our streams define __len__ per rank and worker on purpose (data/webdataset.py batches_for_worker)"),
    (r"Found \d+ module\(s\) in eval mode at the start of training",
     "frozen encoders and teachers are in eval mode on purpose"),
)
# (logger, message pattern, why)
QUIET_LOGS = (
    ("transformers.utils.import_utils", r"requires torchvision .*falling back",
     "there is no CPU build of torchvision; the PIL image processors are used, as intended"),
    ("lightning.pytorch.utilities.rank_zero", r"^(GPU|TPU|HPU) available: ", "the run's device is in its first lines"),
    ("lightning.pytorch.utilities.rank_zero", r"Tip: For seamless", "an advertisement"),
    ("lightning.pytorch.trainer.connectors.checkpoint_connector", r"`weights_only` was not set",
     "about what a checkpoint stores (all state, for exact resume), not about loading an untrusted file"),
)


class _Drop(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    for pattern, _why in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    by_logger: dict[str, list[str]] = {}
    for name, pattern, _why in QUIET_LOGS:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logging.getLogger(name).addFilter(_Drop(patterns))
