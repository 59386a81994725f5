"""`foundry-shards`: write WebDataset shards (digits, a folder, preference pairs) and, with a model, latent caches and
reflow couplings. Bad input exits with one line naming the fix."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data.digits import NUM_DIGITS, default_digits_dir, parse_digits, write_digits_shards
from data.preference import write_pair_shards
from data.shards import WriteSummary, count_samples, write_folder_shards
from data.webdataset import expand_urls
from train.couplings import write_couplings
from train.encode import encode_parallel


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foundry-shards", description="Write WebDataset shards for training.")
    sub = parser.add_subparsers(dest="command", required=True)
    digits = sub.add_parser("digits", help="the built-in scikit-learn digits with captions")
    digits.add_argument("--out", default=None, help="output dir (default: the digits cache, see FOUNDRY_CACHE)")
    digits.add_argument("--resolution", type=int, default=16, help="image size, 16 (default) or 32")
    digits.add_argument("--maxcount", type=int, default=256, help="samples per shard")
    digits.add_argument("--digits", default=None, help="only these digits, e.g. 0-8 or 1,3,5 (default: all ten)")
    pairs = sub.add_parser("pairs", help="preference pairs from a .jsonl/.csv/.parquet table "
                           "(caption, image_0, image_1, label_0: 1 = image 0 preferred, 0 = image 1, 0.5 = tie)")
    pairs.add_argument("table", help="the table; image paths are relative to its folder")
    pairs.add_argument("--out", required=True, help="output dir for the pair shards")
    pairs.add_argument("--maxcount", type=int, default=1000, help="pairs per shard")
    coup = sub.add_parser("couplings", help="(noise, teacher output, caption) from a teacher's ODE, for reflow/DMD")
    coup.add_argument("--teacher", required=True, help="a run directory, .ckpt or diffusers folder")
    coup.add_argument("--out", required=True)
    coup.add_argument("--n", type=int, default=2048, help="how many couplings in all (every rank's share together)")
    coup.add_argument("--prompts", default="digits", help="'digits' or a text file with one prompt per line")
    coup.add_argument("--steps", type=int, default=25)
    coup.add_argument("--guidance", type=float, default=3.0)
    coup.add_argument("--maxcount", type=int, default=256)
    coup.add_argument("--seed", type=int, default=0)
    coup.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    coup.add_argument("--world", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    enc = sub.add_parser("encode", help="cache VAE latents and text embeddings of image shards (training then "
                         "skips the encoders); resumable, shards shared between processes")
    enc.add_argument("urls", nargs="+", help="image shards: files, a directory, a glob or a brace pattern")
    enc.add_argument("--out", required=True, help="output dir for the cached shards (and cache.json)")
    enc.add_argument("--model", required=True, help="the model whose VAE/text encoder to use: a diffusers folder, "
                     "a run directory or a .ckpt (the run must use the same model)")
    enc.add_argument("--dtype", default="fp16", help="storage dtype: fp16 (default), bf16 or fp32")
    enc.add_argument("--vae-dtype", default="fp32", help="VAE compute dtype: fp32 (default) or bf16; never fp16")
    enc.add_argument("--no-text", action="store_true", help="cache latents only (the text encoder runs in training)")
    enc.add_argument("--batch-size", type=int, default=64)
    enc.add_argument("--procs", type=int, default=1, help="processes on this machine, each taking a share of shards")
    enc.add_argument("--part", default="0/1", help="K/N: this machine's share when several machines encode")
    enc.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    folder = sub.add_parser("folder", help="a folder of images with .txt captions, or metadata.jsonl/csv")
    folder.add_argument("path", help="the image folder")
    folder.add_argument("--out", required=True, help="output dir for the shards")
    folder.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    folder.add_argument("--prefix", default="shard", help="shard file prefix: PREFIX-000000.tar")
    folder.add_argument("--overwrite", action="store_true", help="replace existing PREFIX-*.tar shards in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``foundry-shards``; bad input exits with one line naming the fix."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "digits":
            if args.resolution < 8 or args.maxcount <= 0:
                raise ValueError("foundry-shards digits: --resolution must be >= 8 and --maxcount positive")
            subset = parse_digits(args.digits) if args.digits else None
            if subset is not None and not args.out:
                raise ValueError("foundry-shards digits: --digits needs --out (the default cache holds all ten)")
            out = Path(args.out).expanduser() if args.out else default_digits_dir(args.resolution)
            shards = write_digits_shards(out, resolution=args.resolution, maxcount=args.maxcount, digits=subset)
            summary = WriteSummary(shards=shards, written=count_samples(shards) if subset else NUM_DIGITS, skipped={})
            print(summary.line("digits", out))
        elif args.command == "couplings":
            if not 0 <= args.rank < args.world:
                raise ValueError(f"foundry-shards couplings: --rank {args.rank} is not in 0..{args.world - 1}")
            res = write_couplings(args.teacher, args.out, args.n, args.prompts, args.steps, args.guidance,
                                  args.maxcount, args.seed, args.rank, args.world)
            print(f"foundry-shards couplings: rank {args.rank}/{args.world} wrote {len(res['written'])} shard(s), "
                  f"{len(res['already_present'])} already present (resumed) in {args.out}")
        elif args.command == "encode":
            try:
                k, n = (int(v) for v in args.part.split("/"))
            except ValueError:
                raise ValueError(f"foundry-shards encode: --part '{args.part}' is not K/N (e.g. 0/4)") from None
            urls = expand_urls(args.urls)
            parts = [(k * args.procs + j, n * args.procs) for j in range(args.procs)]
            res = encode_parallel(urls, args.out, args.model, args.procs, parts=parts, dtype=args.dtype,
                                  text=not args.no_text, batch_size=args.batch_size, device=args.device,
                                  vae_dtype=args.vae_dtype)
            reasons = ", ".join(f"{r}={c}" for r, c in sorted(res["skipped"].items()) if c) or "none"
            print(f"foundry-shards encode: wrote {len(res['written'])} shard(s) ({res['samples']} samples), "
                  f"{len(res['already_present'])} already present (resumed), skipped {sum(res['skipped'].values())} "
                  f"({reasons}) in {res['seconds']} s -> {res['out']}")
        elif args.command == "pairs":
            result = write_pair_shards(args.table, args.out, args.maxcount)
            reasons = ", ".join(f"{k}={v}" for k, v in result["skipped"].items() if v) or "none"
            print(f"foundry-shards pairs: wrote {result['written']} pairs in {len(result['shards'])} shard(s) "
                  f"in {args.out}; skipped {sum(result['skipped'].values())} ({reasons})")
        else:
            summary = write_folder_shards(args.path, args.out, args.maxcount, args.prefix, args.overwrite)
            for path in summary.missing_captions[:3]:
                print(f"foundry-shards folder: warning: no caption for {path}", file=sys.stderr)
            print(summary.line("folder", Path(args.out)))
    except (ValueError, FileNotFoundError) as exn:
        raise SystemExit(str(exn)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
