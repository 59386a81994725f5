"""Speed without changing the math: the text cache (repeated captions encoded once, same values), the optimizer's
default kernel (bit for bit the reference loop), the step clock used against diffusers' script."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch

from models.tokens import row_keys, tokenize
from train.build import build_module
from train.optim import build_optimizer
from train.text_cache import TextCache

ROOT = Path(__file__).resolve().parents[2]


class Counting(torch.nn.Module):
    """A text encoder stand-in that counts the rows it encodes."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 4)
        self.rows = 0

    def forward(self, ids):
        self.rows += ids.shape[0]
        return self.emb(ids).cumsum(1)


def test_text_cache_encodes_each_distinct_row_once_and_returns_the_same_values():
    enc, cache = Counting(), TextCache(max_mb=1)
    a = torch.tensor([[1, 2, 3], [4, 5, 6], [1, 2, 3]])
    b = torch.tensor([[4, 5, 6], [7, 8, 9]])
    with torch.no_grad():
        out_a, out_b = cache.encode(enc, a), cache.encode(enc, b)
        assert torch.equal(out_a, enc(a)) and torch.equal(out_b, enc(b))
    assert enc.rows == 3 + 2 + 3  # 3 distinct rows in all, then the two direct calls above
    assert (cache.hits, cache.misses) == (2, 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # another precision: other rows
        assert cache.encode(lambda ids: enc(ids).to(torch.bfloat16), a).dtype == torch.bfloat16
    assert cache.misses == 5


def test_text_cache_is_bounded_and_off_at_zero():
    enc = Counting()
    row_bytes = 3 * 4 * 4
    cache = TextCache(max_mb=2.5 * row_bytes / 2**20)  # room for two rows
    with torch.no_grad():
        cache.encode(enc, torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]]))
        assert len(cache.rows) == 2 and cache.bytes == 2 * row_bytes
        off = TextCache(max_mb=0)
        off.encode(enc, torch.tensor([[1, 2, 3]]))
    assert not off.rows


def test_module_uses_the_cache_for_a_frozen_encoder_only(tiny_cfg):
    module = build_module(tiny_cfg())
    ids = tokenize(module.components.tokenizer, ["a handwritten digit one", "a handwritten digit two"] * 4)
    with torch.no_grad():
        direct = module.text_encoder(ids)[0]
    assert torch.equal(module.encode_text(ids, keys=row_keys(ids)), direct)
    assert torch.equal(module.encode_text(ids), direct)  # CPU ids: keys read in place
    assert (module.text_cache.misses, module.text_cache.hits) == (2, 14)
    trained = build_module(tiny_cfg("model.train_text_encoder=true"))
    out = trained.encode_text(ids)
    assert out.requires_grad and not trained.text_cache.rows


def test_loader_batches_carry_host_keys_for_the_cache():
    from data.batch import collate
    from models.tiny import build_tokenizer, default_caption_corpus

    tok = build_tokenizer(default_caption_corpus(), 300, 12)
    batch = collate([{"pixels": torch.zeros(3, 8, 8), "caption": c, "key": str(i)}
                     for i, c in enumerate(["a digit", "a dog", "a digit"])], tokenizer=tok)
    assert batch["id_keys"][0] == batch["id_keys"][2] != batch["id_keys"][1]


def test_default_adamw_is_the_multi_tensor_loop_and_equals_the_reference_loop():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    ours, ref = copy.deepcopy(net), copy.deepcopy(net)
    opt = build_optimizer({"name": "adamw", "lr": 1e-2, "weight_decay": 0.01}, list(ours.parameters()))
    assert opt.defaults["foreach"] and not opt.defaults["fused"]
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01, foreach=False)
    for step in range(5):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        for m, o in ((ours, opt), (ref, ref_opt)):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))
    fused = build_optimizer({"name": "adamw", "lr": 1e-2, "fused": True}, list(net.parameters()))
    assert fused.defaults["fused"]


def test_step_clock_stamps_every_optimizer_step_of_an_unmodified_program(tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text("import sys, torch\np = torch.nn.Parameter(torch.zeros(1))\nopt = torch.optim.SGD([p], lr=1)\n"
                    "for _ in range(int(sys.argv[1])):\n    opt.step()\n")
    out = tmp_path / "steps.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_clock.py"), "--out", str(out), "--", str(prog),
                    "4"], check=True)
    stamps = json.loads(out.read_text())["step_end_seconds"]
    assert len(stamps) == 4 and stamps == sorted(stamps)
