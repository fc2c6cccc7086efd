"""Signed checkpoints of the audit hash chains: what a database writer cannot forge (decision 0215).

A hash chain alone proves nothing to someone who can write the database: they edit a record and
recompute every hash after it and the chain's head. So the gateway signs its chain's head now and
then (every `every_records` records or `every_s` seconds, and at shutdown), with an Ed25519 key kept
in a file beside the built-in authorization server's signing key, never in the database. A
checkpoint says "record `seq` of `chain` had hash `hash` at `time`" (`last`: and nothing follows
it); an anchor, signed when retention prunes a chain, says "records up to `seq` may be gone, and
the chain continues from `hash`". Each goes into the database (`audit_checkpoint`) and, before
that, onto a line of the sink: a file opened with O_APPEND that the database's writers cannot reach.
`verify` holds the chains to every checkpoint it can read.

Nothing here proves anything against someone who holds the key (the gateway's host): they can sign
what they like. Records after a chain's newest checkpoint are not covered until the next one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agentgw.errors import ConfigError
from agentgw.records.audit import CheckpointSettings, timestamp

__all__ = [
    "KEY_FILE",
    "SINK_FILE",
    "Checkpoint",
    "CheckpointKey",
    "CheckpointTrust",
    "Checkpointer",
    "checkpointer",
    "parse_checkpoint",
    "public_text",
    "read_sink",
    "trust",
]

log = logging.getLogger(__name__)

KEY_FILE = "audit-checkpoint-key.pem"
SINK_FILE = "audit-checkpoints.jsonl"
Kind = Literal["head", "anchor"]


def _key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_text(public: Ed25519PublicKey) -> str:
    """A public key as `audit.checkpoints.trusted_keys` takes it: base64 of its 32 raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


class CheckpointKey:
    """The Ed25519 key that signs checkpoints, from a PEM file (PKCS#8, owner-only)."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self.private = private
        self.public = private.public_key()
        self.id = _key_id(self.public)

    @classmethod
    def load(cls, path: Path) -> CheckpointKey | None:
        """The key in `path`, or None if there is no such file.

        Raises:
            ValueError: the file is not an Ed25519 private key.
        """
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> CheckpointKey:
        """The key in `path`; a new one is written there first if the file is missing.

        Two processes starting at once end with the same key: the file gets its name by a hard
        link, which fails if another process linked its own first; the loser reads the winner's.

        Raises:
            ValueError: the file is not an Ed25519 private key.
            OSError: it cannot be read or written.
        """
        found = cls.load(path)
        if found is not None:
            return found
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        loaded = cls.load(path)
        if loaded is None:  # removed between the link and the read
            raise OSError(f"the checkpoint key {path} vanished")
        return loaded


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One signed statement about a chain (see the module's docstring)."""

    kind: Kind
    chain: str
    seq: int
    hash: str
    time: str
    last: bool
    key: str
    sig: str

    def signed(self) -> bytes:
        """The bytes the signature covers: the canonical JSON of every field but `sig`."""
        return _signed(self.kind, self.chain, self.seq, self.hash, self.time, self.last, self.key)

    def line(self) -> bytes:
        """The checkpoint as one JSON line (sink and database alike)."""
        return self.signed()[:-1] + b',"sig":"%s"}\n' % self.sig.encode()


def _signed(kind: str, chain: str, seq: int, hash_: str, at: str, last: bool, key: str) -> bytes:
    body = {"chain": chain, "hash": hash_, "key": key, "kind": kind, "last": last, "seq": seq, "time": at}
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


class Checkpointer:
    """Signs checkpoints and appends each to the sink (one `os.write` of one line, O_APPEND)."""

    def __init__(
        self,
        key: CheckpointKey,
        sink: Path,
        *,
        every_records: int = 10_000,
        every_s: float = 10.0,
        clock: Any = time.time,
    ) -> None:
        self.key = key
        self.sink = sink
        self.every_records = every_records
        self.every_s = every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        try:
            self._open()
        except OSError:
            # Not fatal: records are still stored; what is not in the sink is only in the database.
            log.exception("audit log: cannot open the checkpoint sink %s; the next checkpoint retries", sink)

    def _open(self) -> int:
        if self._fd is None:
            self.sink.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._fd = os.open(self.sink, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return self._fd

    def sign(self, kind: Kind, chain: str, seq: int, hash_: str, *, last: bool = False) -> Checkpoint:
        """A checkpoint of `chain` at `seq`, signed and appended to the sink.

        A sink that cannot be written is logged, and the checkpoint is returned all the same for the
        database: the sink is a second copy, not a condition for storing records.
        """
        at = timestamp(self._clock())
        sig = self.key.private.sign(_signed(kind, chain, seq, hash_, at, last, self.key.id))
        checkpoint = Checkpoint(
            kind, chain, seq, hash_, at, last, self.key.id, base64.b64encode(sig).decode()
        )
        line = checkpoint.line()
        with self._lock:
            try:
                written = os.write(self._open(), line)
                if written != len(line):
                    raise OSError(f"short write ({written} of {len(line)} bytes)")
            except OSError:
                log.exception(
                    "audit log: checkpoint of %r at seq %d not written to %s", chain, seq, self.sink
                )
                self._close()
        return checkpoint

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                log.debug("audit log: closing the checkpoint sink failed", exc_info=True)
            self._fd = None

    def close(self) -> None:
        with self._lock:
            self._close()


@dataclass(frozen=True, slots=True)
class CheckpointTrust:
    """What `verify` holds the chains to: the keys whose checkpoints count, and the sinks to read."""

    keys: dict[str, Ed25519PublicKey]
    sinks: tuple[Path, ...]


def _paths(settings: CheckpointSettings, key_dir: Path) -> tuple[Path, Path]:
    key = settings.key or key_dir / KEY_FILE
    return key, settings.sink or key.parent / SINK_FILE


def checkpointer(settings: CheckpointSettings, key_dir: Path, *, clock: Any = time.time) -> Checkpointer:
    """The gateway's checkpointer: its key (created if missing) and sink, from `audit.checkpoints`.

    Args:
        settings: `audit.checkpoints`.
        key_dir: where the key goes by default: the directory of the built-in server's signing key.

    Raises:
        ConfigError: the key file holds no Ed25519 key, or cannot be read or written.
    """
    key_path, sink = _paths(settings, key_dir)
    try:
        key = CheckpointKey.load_or_create(key_path)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"audit.checkpoints: the key file {key_path}: {exc}") from exc
    # The public half, for `trusted_keys` on the hosts that verify this gateway's chains.
    log.info("audit log: checkpoints are signed with key %s (public key %s)", key.id, public_text(key.public))
    return Checkpointer(
        key, sink, every_records=settings.every_records, every_s=settings.every_s, clock=clock
    )


def trust(
    settings: CheckpointSettings,
    key_dir: Path,
    *,
    sinks: Sequence[Path] = (),
    keys: Iterable[str] = (),
) -> CheckpointTrust:
    """The trust `verify` needs: the local key's public half (if the key file exists; never created),
    `trusted_keys` and `keys`; the sinks given, or else the configured one.

    Raises:
        ConfigError: a trusted key is not base64 of 32 bytes, or the key file holds no Ed25519 key.
    """
    key_path, sink = _paths(settings, key_dir)
    publics: dict[str, Ed25519PublicKey] = {}
    try:
        local = CheckpointKey.load(key_path)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"audit.checkpoints: the key file {key_path}: {exc}") from exc
    if local is not None:
        publics[local.id] = local.public
    for text in [*settings.trusted_keys, *keys]:
        try:
            public = Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
        except (ValueError, binascii.Error) as exc:
            raise ConfigError(
                f"audit.checkpoints: not an Ed25519 public key (base64 of 32 bytes): {text!r}"
            ) from exc
        publics[_key_id(public)] = public
    return CheckpointTrust(publics, tuple(sinks) or (sink,))


def parse_checkpoint(line: bytes | str, keys: dict[str, Ed25519PublicKey]) -> Checkpoint:
    """A checkpoint line, its signature checked against `keys`.

    Raises:
        ValueError: not a checkpoint, signed by a key not in `keys`, or a signature that does not hold.
    """
    try:
        data = orjson.loads(line)
        checkpoint = Checkpoint(
            data["kind"],
            data["chain"],
            int(data["seq"]),
            data["hash"],
            data["time"],
            bool(data["last"]),
            data["key"],
            data["sig"],
        )
        if checkpoint.kind not in ("head", "anchor") or not isinstance(checkpoint.chain, str):
            raise ValueError("not a checkpoint")
        public = keys.get(checkpoint.key)
        if public is None:
            raise ValueError(
                f"signed by key {checkpoint.key}, which is not trusted (audit.checkpoints.trusted_keys)"
            )
        public.verify(base64.b64decode(checkpoint.sig, validate=True), checkpoint.signed())
    except InvalidSignature:
        raise ValueError("its signature does not hold") from None
    except (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error) as exc:
        raise ValueError(f"not a checkpoint ({exc})") from None
    return checkpoint


def read_sink(path: Path, keys: dict[str, Ed25519PublicKey]) -> Iterator[Checkpoint]:
    """Every checkpoint in the sink file `path`, read a line at a time (a torn last line, a write cut
    short, is skipped).

    Raises:
        OSError: the file cannot be read.
        ValueError: a line is not a checkpoint signed by one of `keys` (the message names it).
    """
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.endswith(b"\n"):
                return  # the last line, torn
            try:
                yield parse_checkpoint(line, keys)
            except ValueError as exc:
                raise ValueError(f"line {number} of the checkpoint sink {path}: {exc}") from None
