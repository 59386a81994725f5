"""Reading shards: URLs as users write them, tar members grouped into samples (dropping a truncated shard's partial
last sample), and local copies of remote shards (`data.shard_cache_dir`)."""

from __future__ import annotations

import glob
import os
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import webdataset as wds

BUILD_HINT = "Build shards with 'foundry-shards digits' or 'foundry-shards folder DIR --out OUT', or fix the path."

def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard URLs from what a user wrote in ``data.urls``.

    Brace patterns and ``::`` lists expand as in webdataset; local globs and
    directories expand to sorted ``.tar`` files; ``s3://`` and ``http(s)://``
    become ``pipe:`` commands; ``pipe:`` URLs pass through. Local paths are
    checked now so a typo fails in one line before any heavy work.
    """
    if isinstance(urls, (str, os.PathLike)):
        urls = [str(urls)]
    result: list[str] = []
    for entry in list(urls):
        for url in wds.shardlists.expand_urls(str(entry)):
            result.extend(_expand_one(url.strip()))
    if not result:
        raise ValueError(f"data.urls is empty. {BUILD_HINT}")
    return result


def _expand_one(url: str) -> list[str]:
    if url.startswith("pipe:"):
        return [url]
    if url.startswith("s3://"):
        return [f"pipe:aws s3 cp {shlex.quote(url)} -"]
    if url.startswith(("http://", "https://")):
        return [f"pipe:curl -s -L {shlex.quote(url)}"]
    path = os.path.expanduser(url.removeprefix("file:"))
    if glob.has_magic(path):
        # absolute paths: a file named "pipe:..." found by a glob must stay a file, never become a command
        found = sorted(os.path.abspath(p) for p in glob.glob(path))
        if not found:
            raise FileNotFoundError(f"data.urls: no shard at '{path}'. {BUILD_HINT}")
        return found
    if os.path.isdir(path):
        found = sorted(str(p.resolve()) for p in Path(path).glob("*.tar"))
        if not found:
            raise FileNotFoundError(f"data.urls: no .tar shards in directory '{path}'. {BUILD_HINT}")
        return found
    if not os.path.exists(path):
        raise FileNotFoundError(f"data.urls: no shard at '{path}'. {BUILD_HINT}")
    return [path]


def tar_samples(sources: Iterator[dict[str, Any]], handler: Any) -> Iterator[dict[str, Any]]:
    """wds.tarfile_to_samples, except that a shard which ends in a read error drops its partial last sample.

    Stock webdataset carries the half-read sample into the next shard, where
    it is yielded with members missing or, if the next shard starts with the
    same key, merged with another sample's members: a caption on the wrong image.
    """
    tariterators = wds.tariterators
    return tariterators.group_by_keys(_shard_files(tariterators.url_opener(sources, handler=handler), handler),
                                      handler=handler)


def _shard_files(streams: Iterator[dict[str, Any]], handler: Any) -> Iterator[dict[str, Any]]:
    tariterators = wds.tariterators
    for source in streams:
        last_key, clean = None, False
        for item in tariterators.tar_file_expander([source], handler=handler):
            if item == {}:
                clean = True  # webdataset's end-of-shard marker: the shard was read to the end
            else:
                last_key = tariterators.base_plus_ext(item["fname"])[0] or last_key
            yield item
        if not clean:
            if last_key is not None:  # group_by_keys drops samples that valid_sample() sees flagged __bad__
                yield {"fname": f"{last_key}.__bad__", "data": True, "__url__": source["url"]}
            yield {}


def local_shard_path(url: str, cache_dir: str | os.PathLike) -> Path:
    """Where a remote shard's local copy lives: a digest of the URL (unique) plus its file name (readable)."""
    import hashlib

    name = url.rstrip("/").split("/")[-1].split()[0] or "shard.tar"
    return Path(cache_dir).expanduser() / f"{hashlib.sha1(url.encode()).hexdigest()[:16]}-{name}"


def cache_remote_shards(sources: Iterator[dict[str, Any]], cache_dir: str, handler: Any) -> Iterator[dict[str, Any]]:
    """A shard-list stage: each remote URL is replaced by a local copy, downloaded whole on first use into a
    temporary file and renamed (so a killed download never leaves a truncated shard that looks complete)."""
    import shutil

    for source in sources:
        url = source["url"]
        if not url.startswith("pipe:"):
            yield source
            continue
        dest = local_shard_path(url, cache_dir)
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            try:
                with wds.gopen(url, "rb") as stream, open(tmp, "wb") as out:
                    shutil.copyfileobj(stream, out, 1 << 20)
                os.replace(tmp, dest)
            except Exception as exn:  # noqa: BLE001 - a failed download is a read error of that shard
                tmp.unlink(missing_ok=True)
                if handler(exn):
                    continue
                raise
        yield {**source, "url": str(dest)}
