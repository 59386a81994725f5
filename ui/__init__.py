"""foundry-ui: a local web app over the files and commands the CLI uses (runs, compare, new run, subject wizard).

It imports the operations layer (train.ops) and below; nothing imports it (tests/unit/test_layers.py)."""
