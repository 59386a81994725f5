"""Which names hold credentials, in one rule: saved configs, logs, command lines, environment variables and git
diffs are all redacted by it (train/build.py scrubs configs, train/ops/tracking.py logs and files)."""
from __future__ import annotations

import os
import re
from typing import Any, Iterable

REDACTED = "<redacted>"
# Words that mark a credential anywhere in a name: OPENAI_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY,
# GOOGLE_APPLICATION_CREDENTIALS, db_password, client_secret, ssh_private_key, ...
SECRET_WORDS = re.compile(r"api[_-]?key|token(?![a-z])|secret|passw(?:or)?d|credential|private[_-]?key|access[_-]?key|"
                          r"session[_-]?key|signing[_-]?key", re.IGNORECASE)
# ... and any name that ends in a key or key id: AWS_ACCESS_KEY_ID, STRIPE_KEY, logger.key, encryption-key.
KEY_SUFFIX = re.compile(r"(?:^|[_-])key(?:[_-]?id)?$", re.IGNORECASE)
# This platform's own settings that end in `_key` and name a field of a sample, not a credential.
NOT_SECRET = frozenset({"caption_key", "image_key", "sort_key", "ext_key", "last_key"})
NAME_SEP = re.compile(r"([\w.+~/-]+)\s*[=:]\s*")  # `name=` or `name: ` in free text
VALUE = re.compile(r"\"[^\"]*\"|'[^']*'|[^\s,;'\"\]}]+")
MIN_ENV_SECRET = 8  # shorter environment values are too common to redact from free text


def is_secret_name(name: Any) -> bool:
    """True for a config key, override key or environment variable whose value must never be written out."""
    leaf = str(name).lstrip("+~").rsplit(".", 1)[-1].rsplit("/", 1)[-1]
    if leaf.lower() in NOT_SECRET:
        return False
    return bool(SECRET_WORDS.search(leaf) or KEY_SUFFIX.search(leaf))


def scrub(obj: Any) -> Any:
    """Drop values under secret-looking keys (nested dicts and lists), so configs saved or logged carry none."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_name(k) else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def secret_env_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look secret, longest first."""
    env = os.environ if environ is None else environ
    return sorted({v for k, v in env.items() if is_secret_name(k) and len(v) >= MIN_ENV_SECRET}, key=len,
                  reverse=True)


def redact(text: str) -> str:
    """`text` with the value of every secret-looking environment variable replaced."""
    for value in secret_env_values():
        text = text.replace(value, REDACTED)
    return text


def redact_text(text: str) -> str:
    """Free text (a log line, a command line, a diff): secret env values and `secret_name=value` /
    `secret_name: value` values redacted."""
    text, out, pos = redact(text), [], 0
    for m in NAME_SEP.finditer(text):  # names only, so `overrides: +x.api_token=v` reaches the inner name too
        value = VALUE.match(text, m.end()) if m.start() >= pos and is_secret_name(m.group(1)) else None
        if value:
            out += [text[pos:m.end()], REDACTED]
            pos = value.end()
    return "".join(out) + text[pos:]


def scrub_overrides(overrides: Iterable[str]) -> list[str]:
    """`key=value` overrides with the value dropped where the key looks secret."""
    out = []
    for o in overrides:
        key, sep, _ = str(o).partition("=")
        out.append(f"{key}={REDACTED}" if sep and is_secret_name(key) else redact(str(o)))
    return out
