"""Privacy: the per-install salt, salted hashes of arguments, and redaction of secrets.

- `standard` keeps a keyed BLAKE2b hash of the arguments (canonical JSON, sorted keys) under
  a salt made once per install and kept in the user's data dir (`<data_dir>/salt`, mode 0600):
  equal arguments give equal hashes on one install, and nothing can be compared across installs
  or reversed by hashing guesses without the salt.
- `detailed` keeps the arguments with secrets redacted (`redact`): values under keys that name
  a secret (token, secret, password, api_key, authorization, ...), bearer strings, emails and
  long random-looking strings (keys, hashes, JWTs) are replaced by markers. Under a secret key
  only strings (and lists of strings) are replaced: numbers such as `max_tokens` stay, and a
  nested mapping is walked so its own keys decide.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import secrets
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from mcpopt.datafiles import private_dir

REDACTED = "[REDACTED]"
EMAIL = "[EMAIL]"

_SECRET_KEY = re.compile(
    r"(?i)(token|secret|passw(or)?d|passphrase|pwd|api[_-]?key|apikey|access[_-]?key|private[_-]?key|"
    r"authorization|auth(?!or)|credential|cookie|session[_-]?id|signature|client[_-]?secret)"
)
_BEARER = re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=\-]{6,}")
_ASSIGN = re.compile(
    r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|authorization)(\s*[=:]\s*)"
    r"((?:bearer|basic)\s+)?(\"[^\"]*\"|'[^']*'|[^\s,;&\"']+)"
)
_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
_CANDIDATE = re.compile(r"[A-Za-z0-9_\-+/=.]{20,}")
_URL_CREDS = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^/\s:@]+):([^/\s@]+)@")

MAX_DEPTH = 8
MAX_STRING = 2_000
"""Longer strings are cut (after redaction) so one record stays small."""


def load_salt(path: Path) -> bytes:
    """The install's salt (32 random bytes), created on first use with mode 0600.

    Raises:
        OSError: the file can neither be read nor created (telemetry then hashes with a
            process-lifetime salt; see `Telemetry`).
    """
    try:
        data = path.read_bytes()
        if len(data) >= 16:
            return data
    except FileNotFoundError:
        pass
    private_dir(path.parent)
    salt = secrets.token_bytes(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, salt)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and never overwrites a salt another process just made
    except FileExistsError:
        salt = path.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    return salt


def hash_arguments(arguments: Mapping[str, Any] | None, salt: bytes) -> str:
    """16 hex characters: keyed BLAKE2b of the arguments' canonical JSON ("" for no arguments)."""
    if not arguments:
        return ""
    try:
        data = orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except TypeError:
        data = repr(arguments).encode()
    return hashlib.blake2b(data, key=salt[:64], digest_size=8).hexdigest()


class ArgumentHasher:
    """`hash_arguments` under one salt, for the record path: the keyed BLAKE2b state is made once
    (each hash copies it), and the digests of the last `size` distinct short encodings are kept
    (a tool called again with the same arguments costs one serialization and one dict lookup).

    `hasher(arguments)` returns exactly `hash_arguments(arguments, salt)` (16 hex characters, ""
    for no arguments). Only encodings of at most `max_bytes` bytes are remembered, so memory stays
    under `size * max_bytes` bytes plus the digests (128 KiB by default).
    """

    __slots__ = ("_base", "_digests", "size", "max_bytes")

    def __init__(self, salt: bytes, size: int = 256, max_bytes: int = 512) -> None:
        self._base = hashlib.blake2b(key=salt[:64], digest_size=8)
        self._digests: dict[bytes, str] = {}
        self.size = size
        self.max_bytes = max_bytes

    def __call__(self, arguments: Mapping[str, Any] | None) -> str:
        if not arguments:
            return ""
        try:
            data = orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
        except TypeError:
            data = repr(arguments).encode()
        digests = self._digests
        digest = digests.get(data)
        if digest is None:
            h = self._base.copy()
            h.update(data)
            digest = h.hexdigest()
            if len(data) <= self.max_bytes:
                if len(digests) >= self.size:
                    del digests[next(iter(digests))]  # the oldest one in
                digests[data] = digest
        return digest


def hash_id(value: str, salt: bytes) -> str:
    """A salted digest of an identifier (session ids are never stored as given)."""
    if not value:
        return ""
    return hashlib.blake2b(value.encode(), key=salt[:64], digest_size=8).hexdigest()


def _entropy(text: str) -> float:
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())


def _looks_random(token: str) -> bool:
    """A key, hash or token rather than a word, a path or a version: its longest run between
    separators (`/ . _ -`) is 16+ characters of mixed classes with high entropy."""
    run = max(re.split(r"[/._\-]", token), key=len)
    if len(run) < 16:
        return False
    classes = sum(
        (
            any(c.islower() for c in run),
            any(c.isupper() for c in run),
            any(c.isdigit() for c in run),
        )
    )
    if classes < 2:
        return False
    digits = sum(c.isdigit() for c in run)
    return _entropy(run) >= 3.0 and (digits >= 2 or classes == 3)


def redact_text(text: str) -> str:
    """Replace credentials in URLs, `key=value` secrets, bearer strings, emails and random tokens."""
    text = _URL_CREDS.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    text = _ASSIGN.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _EMAIL.sub(EMAIL, text)
    text = _CANDIDATE.sub(lambda m: REDACTED if _looks_random(m.group(0)) else m.group(0), text)
    if len(text) > MAX_STRING:
        text = text[:MAX_STRING] + f"...[{len(text) - MAX_STRING} more]"
    return text


def redact(value: Any, depth: int = 0) -> Any:
    """A copy of `value` (JSON-like) with secrets replaced; see the module docstring for the rules."""
    if isinstance(value, str):
        return redact_text(value)
    if depth >= MAX_DEPTH:
        return "[...]"
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            skey = str(key)
            if _SECRET_KEY.search(skey) and (isinstance(item, str) and item or _strings(item)):
                out[redact_text(skey)] = REDACTED  # nested mappings are walked: their keys decide
            else:
                out[redact_text(skey)] = redact(item, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [redact(item, depth + 1) for item in value[:200]]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact_text(str(value))


def _strings(value: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and all(isinstance(v, str) for v in value)


def redacted_json(arguments: Mapping[str, Any] | None) -> str:
    """The redacted arguments as compact JSON ("" for none)."""
    if not arguments:
        return ""
    return orjson.dumps(redact(arguments)).decode()
