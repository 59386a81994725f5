"""Operations around the engine: the CLIs, launch plans, sweeps, tracking, reports, export, sampling, evaluation.

They import the engine (train/), callbacks, data and models; nothing below imports them (tests/unit/test_layers.py).
"""
from train.ops.console import install as _quiet_console

_quiet_console()  # every CLI here imports this package first, before the libraries whose notes it drops
