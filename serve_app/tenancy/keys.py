"""API keys as customers: an id, a name, secrets held as SHA-256 hashes, limits and credit, from a keys file.

The keys file (YAML or JSON; `tenancy.keys_file` or CLIP_KEYS_FILE) holds only hashes (`sha256:<hex>`); a plain
secret is accepted for local use and hashed on load. Every ingress replica re-reads the file when it changes
(`KeyRing.reload_if_changed`, polled by the ingress), so a key is added, rotated (an id may hold two secrets
while its clients move over) or revoked without a restart. A file that fails to parse keeps the keys already
loaded, and says why in the log.

    defaults:                      # the limits of every key that sets none of its own (null: unlimited)
      requests_per_minute: 3000
      tokens_per_minute: 2000000
      images_per_minute: 20000
    keys:
      - id: key_acme
        name: ACME (production)
        secrets: ["sha256:9f86d0…"]
        requests_per_minute: 600
        credit_usd: 5.00           # free credit; omit for no credit limit (billed afterwards)
    admin_keys:                    # reach /v1/organization/* only
      - id: key_ops
        secrets: ["sha256:…"]

Secrets are compared by their hash: a request's token is hashed and looked up, so the time a lookup takes says
nothing about any secret. Nothing here logs, raises or returns a secret or its hash.
"""

import hashlib
import json
import logging
import os
import re
import secrets as secrets_module
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

logger = logging.getLogger("serve_app.tenancy")

HASH_PREFIX = "sha256:"
KEY_ID = re.compile(r"^key_[A-Za-z0-9_-]{1,64}$")
NANO = 1_000_000_000  # credit is held in nano-USD: integers add up exactly, a caption costs a fraction of a micro-USD


def hash_secret(secret: str | bytes) -> str:
    """`sha256:<hex>` of a secret, the form the keys file stores."""
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    return HASH_PREFIX + hashlib.sha256(raw).hexdigest()


def new_secret() -> str:
    """A fresh API key: 32 random bytes, URL-safe, with OpenAI's `sk-` prefix so that secret scanners see it."""
    return "sk-clip-" + secrets_module.token_urlsafe(32)


def derived_key_id(secret: bytes) -> str:
    """The id of a key configured only as a secret (`api_keys`, CLIP_API_KEYS): a short digest, stable across
    replicas and restarts. 64 bits of a hash of a random secret say nothing usable about it."""
    return "key_" + hashlib.sha256(b"clip-key-id:" + secret).hexdigest()[:16]


class KeyLimits(BaseModel):
    """Per-minute limits; None is unlimited."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    images_per_minute: int | None = Field(default=None, ge=1)


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    name: str | None = None
    secrets: list[str] = Field(min_length=1, max_length=4)
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    images_per_minute: int | None = Field(default=None, ge=1)
    credit_usd: float | None = Field(default=None, ge=0)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not KEY_ID.match(value):
            raise ValueError("a key id is `key_` and 1 to 64 letters, digits, `_` or `-`")
        return value

    @field_validator("secrets")
    @classmethod
    def _hashes(cls, values: list[str]) -> list[str]:
        """Plain secrets become their hashes here: after loading, only hashes are held."""
        out = []
        for value in values:
            if value.startswith(HASH_PREFIX):
                digest = value[len(HASH_PREFIX):].lower()
                if not re.fullmatch(r"[0-9a-f]{64}", digest):
                    raise ValueError("a `sha256:` secret is 64 hexadecimal digits")
                out.append(HASH_PREFIX + digest)
            else:
                if not value or any(c.isspace() for c in value) or not value.isprintable():
                    raise ValueError("a secret is printable and has no whitespace")
                out.append(hash_secret(value))
        return out


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    defaults: KeyLimits = Field(default_factory=KeyLimits)
    keys: list[_KeyEntry] = Field(default_factory=list)
    admin_keys: list[_KeyEntry] = Field(default_factory=list)


@dataclass(frozen=True)
class Key:
    """One customer's key as the service holds it (no secret, no hash)."""

    id: str
    name: str | None = None
    limits: KeyLimits = field(default_factory=KeyLimits)
    credit_nano_usd: int | None = None  # the file's grant; None: no credit limit
    admin: bool = False

    def public(self) -> dict[str, Any]:
        """What the admin listing shows."""
        return {"id": self.id, "name": self.name, "admin": self.admin, **self.limits.model_dump()}


class KeyRing:
    """The keys this replica accepts: `sha256(token)` → Key. Immutable once built; reloading swaps the ring."""

    def __init__(self, keys: dict[bytes, Key], source: str = "") -> None:
        self._by_hash = keys
        self.source = source
        self.keys = {k.id: k for k in keys.values()}

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, token: bytes | None) -> Key | None:
        if token is None:
            return None
        return self._by_hash.get(hashlib.sha256(token).digest())

    @classmethod
    def from_secrets(cls, secrets: tuple[bytes, ...], limits: KeyLimits | None = None) -> "KeyRing":
        """Keys configured as plain secrets: each its derived id, the default limits, no credit limit."""
        return cls({hashlib.sha256(s).digest(): Key(derived_key_id(s), limits=limits or KeyLimits())
                    for s in secrets})

    def merged(self, other: "KeyRing") -> "KeyRing":
        clash = set(self.keys) & set(other.keys)
        if clash:
            raise ValueError(f"key ids configured twice: {', '.join(sorted(clash))}")
        return KeyRing({**self._by_hash, **other._by_hash}, self.source or other.source)


def parse_keys_file(text: str, source: str = "keys file") -> KeyRing:
    """The ring a keys file describes; ValueError naming what is wrong (never a secret)."""
    try:
        raw = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{source} is not valid YAML or JSON: {str(exc).splitlines()[0]}") from None
    try:
        parsed = _KeysFile.model_validate(raw or {})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise ValueError(f"{source}: {problems}") from None
    by_hash: dict[bytes, Key] = {}
    ids: set[str] = set()
    for entry, admin in [(e, False) for e in parsed.keys] + [(e, True) for e in parsed.admin_keys]:
        if entry.id in ids:
            raise ValueError(f"{source}: key id {entry.id} appears twice")
        ids.add(entry.id)
        own = {n: getattr(entry, n) for n in KeyLimits.model_fields if n in entry.model_fields_set}
        limits = parsed.defaults.model_copy(update=own)
        credit = None if entry.credit_usd is None else round(entry.credit_usd * NANO)
        key = Key(entry.id, entry.name, limits, credit, admin)
        for digest in entry.secrets:
            raw_hash = bytes.fromhex(digest[len(HASH_PREFIX):])
            if raw_hash in by_hash:
                raise ValueError(f"{source}: one secret is given to two keys ({by_hash[raw_hash].id}, {entry.id})")
            by_hash[raw_hash] = key
    return KeyRing(by_hash, source)


class KeysFile:
    """A keys file watched for changes: `reload_if_changed` re-reads it when its identity (inode, size,
    modification time: a Kubernetes Secret update swaps a symlink) changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._refused: tuple[int, int, int] | None = None  # a version that failed to load: said once
        self.ring = KeyRing({}, path)
        self.reload_if_changed(strict=True)

    def _identity(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def reload_if_changed(self, strict: bool = False) -> bool:
        """True when a new ring was loaded. At start (`strict`) a bad file is an error; later it is logged
        and the keys already loaded stay."""
        try:
            stamp = self._identity()
            if stamp in (self._stamp, self._refused):
                return False
            ring = parse_keys_file(Path(self.path).read_text(encoding="utf-8"), f"keys file {self.path}")
        except (OSError, ValueError) as exc:
            message = exc.strerror if isinstance(exc, OSError) else str(exc)
            if strict:
                raise ValueError(f"cannot load the keys file {self.path}: {message}") from None
            if not isinstance(exc, OSError):
                self._refused = stamp
            logger.error("keys file not reloaded, the loaded keys stay: %s", message)
            return False
        if len(ring) == 0 and len(self.ring) > 0 and not strict:
            # most likely read half-written (write keys files by rename): keep the keys loaded
            logger.error("keys file %s now holds no keys; not applied (remove keys one by one, or restart)", self.path)
            self._refused = stamp
            return False
        self._stamp, self.ring = stamp, ring
        logger.info("keys file %s loaded: %d keys", self.path, len(ring))
        return True
