"""Speed without changing the math: the encoders' row caches (repeated captions and images encoded once, same values),
the optimizer's default kernel (bit for bit the reference loop), the step clock used against diffusers' script."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch

from models.tokens import row_keys, tokenize
from train.build import build_module
from train.optim import build_optimizer
from train.row_cache import RowCache

ROOT = Path(__file__).resolve().parents[2]


class Counting(torch.nn.Module):
    """A text encoder stand-in that counts the rows it encodes."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 4)
        self.rows = 0

    def forward(self, ids):
        self.rows += ids.shape[0]
        return (self.emb(ids).cumsum(1),)


def keys(ids):
    return row_keys(ids)


def test_row_cache_encodes_each_distinct_row_once_and_returns_the_same_values():
    enc, cache = Counting(), RowCache(max_mb=1)
    a = torch.tensor([[1, 2, 3], [4, 5, 6], [1, 2, 3]])
    b = torch.tensor([[4, 5, 6], [7, 8, 9]])
    with torch.no_grad():
        (out_a,), (out_b,) = cache.encode(enc, a, keys(a)), cache.encode(enc, b, keys(b))
        assert torch.equal(out_a, enc(a)[0]) and torch.equal(out_b, enc(b)[0])
    assert enc.rows == 3 + 2 + 3  # 3 distinct rows in all, then the two direct calls above
    assert (cache.hits, cache.misses) == (2, 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # another precision: other rows
        assert cache.encode(lambda ids: (enc(ids)[0].to(torch.bfloat16),), a, keys(a))[0].dtype == torch.bfloat16
    assert cache.misses == 5
    assert cache.encode(enc, a, None)[0].shape == (3, 3, 4) and cache.misses == 5  # no host keys: not cached


def test_row_cache_bounds_evict_or_keep_the_first_rows():
    enc = Counting()
    row_bytes = 3 * 4 * 4
    ids = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    with torch.no_grad():
        lru = RowCache(max_mb=2.5 * row_bytes / 2**20)  # room for two rows
        lru.encode(enc, ids, keys(ids))
        assert len(lru.rows) == 2 and lru.bytes == 2 * row_bytes and keys(ids)[0] not in {k[3:] for k in lru.rows}
        first = RowCache(max_mb=2.5 * row_bytes / 2**20, evict=False)  # the latent cache: the first rows stay
        first.encode(enc, ids, keys(ids))
        assert [k[3:] for k in first.rows] == keys(ids)[:2]
        off = RowCache(max_mb=0)
        off.encode(enc, ids, keys(ids))
    assert not off.rows


def test_latent_cache_gives_the_same_moments_and_samples(tiny_cfg):
    from data.batch import pixel_keys

    module = build_module(tiny_cfg("model.preset=micro_latent"))
    pixels = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pixels[3] = pixels[0]  # a repeated image
    with torch.no_grad():
        ref = module.components.spec.encode_latents(module.vae, pixels)
        for _ in range(2):  # the second pass is served from the cache
            module.noise_generator.manual_seed(5)
            cached = module.encode_images(pixels, keys=pixel_keys(pixels))
            module.noise_generator.manual_seed(5)
            assert torch.equal(cached, module.sample_latents(*ref))
    assert (module.latent_cache.misses, module.latent_cache.hits) == (5, 7)


def test_module_uses_the_text_cache_for_a_frozen_encoder_only(tiny_cfg):
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


def test_loader_batches_carry_host_keys_for_the_caches():
    from data.batch import collate
    from models.tiny import build_tokenizer, default_caption_corpus

    tok = build_tokenizer(default_caption_corpus(), 300, 12)
    batch = collate([{"pixels": torch.zeros(3, 8, 8), "caption": c, "key": str(i)}
                     for i, c in enumerate(["a digit", "a dog", "a digit"])], tokenizer=tok)
    assert batch["id_keys"][0] == batch["id_keys"][2] != batch["id_keys"][1]
    assert batch["pixel_keys"][0] == batch["pixel_keys"][2] and len(set(batch["pixel_keys"])) == 1


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
