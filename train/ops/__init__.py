"""Operations around the engine: the CLIs, launch plans, sweeps, tracking, reports, export, sampling, evaluation.

They import the engine (train/), callbacks, data and models; nothing below imports them (tests/unit/test_layers.py).
"""
