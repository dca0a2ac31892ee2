"""The audit log: one encrypted, hash-chained record per request.

Each line of `STATE_DIR/audit.log` is JSON: `seq`, `key` (the id of the encryption key), `nonce`, `data`
(the record, AES-256-GCM with `cryptography`, a fresh 96-bit nonce per record, `seq` and `prev` as
associated data) and `hash` = SHA-256(prev hash ‖ seq ‖ key ‖ nonce ‖ data). Every line commits to the one
before it, and `audit.head` holds the last `seq` and `hash`, so an edited line (its tag or its hash fails),
a removed line (a gap in `seq` or a broken link) and a cut tail (the head is ahead) are all detected by
`verify`. Appends take an exclusive `flock`, so replicas on one host may share the file.

The encryption key comes from `LMSMITH_AUDIT_KEY` (base64 of 32 bytes) or a key file, never from a
recipe or flag; `rotate-key` re-encrypts every record under a new key after verifying the chain.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from lmsmith.errors import UserError

LOG = "audit.log"
HEAD = "audit.head"
GENESIS = "0" * 64
KEY_ENV = "LMSMITH_AUDIT_KEY"


def load_key(key_file: str | Path | None = None) -> bytes:
    """The 32-byte key from `key_file` or `LMSMITH_AUDIT_KEY` (base64 either way)."""
    if key_file is not None:
        text, where = Path(key_file).read_text().strip(), str(key_file)
    elif os.environ.get(KEY_ENV):
        text, where = os.environ[KEY_ENV].strip(), KEY_ENV
    else:
        raise UserError(f"the audit log needs a key: set {KEY_ENV} (base64 of 32 random bytes, e.g. "
                        "`openssl rand -base64 32`) or give a key file")
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        raise UserError(f"{where}: not base64") from None
    if len(key) != 32:
        raise UserError(f"{where}: an AES-256 key is 32 bytes, this one is {len(key)}")
    return key


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"lmsmith-audit-key" + key).hexdigest()[:12]


def _link(prev: str, seq: int, kid: str, nonce: str, data: str) -> str:
    return hashlib.sha256(f"{prev}|{seq}|{kid}|{nonce}|{data}".encode()).hexdigest()


def _aad(seq: int, prev: str) -> bytes:
    return f"{seq}|{prev}".encode()


@dataclass
class Problem:
    seq: Optional[int]
    what: str


class AuditLog:
    """Append records; read, verify and re-key the log in `folder`."""

    def __init__(self, folder: Path, key: bytes):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._aes, self._kid = AESGCM(key), key_id(key)

    @property
    def path(self) -> Path:
        return self.folder / LOG

    def _head(self) -> tuple[int, str]:
        head = self.folder / HEAD
        if not head.exists():
            return 0, GENESIS
        saved = json.loads(head.read_text())
        return int(saved["seq"]), str(saved["hash"])

    def append(self, record: dict[str, Any]) -> int:
        """Encrypt and chain `record`; returns its sequence number."""
        with open(self.folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            seq, prev = self._head()
            seq += 1
            nonce = os.urandom(12)
            plain = json.dumps(record, ensure_ascii=False, sort_keys=True).encode()
            data = base64.b64encode(self._aes.encrypt(nonce, plain, _aad(seq, prev))).decode()
            nonce_text = base64.b64encode(nonce).decode()
            digest = _link(prev, seq, self._kid, nonce_text, data)
            line = json.dumps({"seq": seq, "key": self._kid, "nonce": nonce_text, "data": data, "hash": digest})
            with self.path.open("a", encoding="utf-8") as out:
                out.write(line + "\n")
                out.flush()
                os.fsync(out.fileno())
            head_tmp = self.folder / (HEAD + ".tmp")
            head_tmp.write_text(json.dumps({"seq": seq, "hash": digest}))
            head_tmp.replace(self.folder / HEAD)
        return seq

    def _lines(self) -> Iterator[tuple[int, dict[str, Any] | None]]:
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError:
                    yield number, None

    def verify(self) -> list[Problem]:
        """Every way the log differs from what was appended (empty: intact)."""
        problems: list[Problem] = []
        prev, expected = GENESIS, 1
        for number, entry in self._lines():
            if entry is None or not {"seq", "key", "nonce", "data", "hash"} <= set(entry):
                problems.append(Problem(None, f"{self.path}:{number}: not an audit record"))
                continue
            seq = entry["seq"]
            if seq != expected:
                problems.append(Problem(seq, f"record {seq} follows {expected - 1}: "
                                             f"{'records removed' if seq > expected else 'records out of order'}"))
            if _link(prev, seq, entry["key"], entry["nonce"], entry["data"]) != entry["hash"]:
                problems.append(Problem(seq, f"record {seq}: its hash does not chain from the record before "
                                             "(edited, inserted or a predecessor removed)"))
            elif entry["key"] == self._kid and self._decrypt(entry, prev) is None:
                problems.append(Problem(seq, f"record {seq}: its ciphertext fails authentication (edited)"))
            elif entry["key"] != self._kid:
                problems.append(Problem(seq, f"record {seq}: encrypted under key {entry['key']}, not this key "
                                             f"({self._kid}); rotate-key re-encrypts old records"))
            prev, expected = entry["hash"], seq + 1
        head_seq, head_hash = self._head()
        if head_seq != expected - 1 or (head_seq and head_hash != prev):
            problems.append(Problem(head_seq, f"the head says record {head_seq} is last, the log ends at "
                                              f"{expected - 1}: records cut from the end"))
        return problems

    def _decrypt(self, entry: dict[str, Any], prev: str) -> Optional[dict[str, Any]]:
        from cryptography.exceptions import InvalidTag

        try:
            plain = self._aes.decrypt(base64.b64decode(entry["nonce"]), base64.b64decode(entry["data"]),
                                      _aad(entry["seq"], prev))
        except (InvalidTag, ValueError):
            return None
        return json.loads(plain)

    def read(self) -> Iterator[dict[str, Any]]:
        """The decrypted records, in order; a record this key cannot open is an error naming it."""
        prev = GENESIS
        for number, entry in self._lines():
            if entry is None:
                raise UserError(f"{self.path}:{number}: not an audit record")
            record = self._decrypt(entry, prev)
            if record is None:
                raise UserError(f"{self.path}:{number}: record {entry.get('seq')} does not open with this key "
                                f"({self._kid}; it was written with {entry.get('key')}) or was edited")
            yield {"seq": entry["seq"], **record}
            prev = entry["hash"]

    def rotate(self, new_key: bytes) -> int:
        """Re-encrypt every record under `new_key` (after verifying the chain); returns how many."""
        problems = self.verify()
        if problems:
            raise UserError(f"{self.path}: will not re-key a log that fails verification: {problems[0].what}")
        records = [{k: v for k, v in record.items() if k != "seq"} for record in self.read()]
        staging = self.folder / ".rotate"
        staging.mkdir(exist_ok=True)
        for stale in staging.iterdir():
            stale.unlink()
        fresh = AuditLog(staging, new_key)
        for record in records:
            fresh.append(record)
        with open(self.folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            (staging / LOG).replace(self.path)
            (staging / HEAD).replace(self.folder / HEAD)
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
        return len(records)


def utc(stamp: Optional[float] = None) -> str:
    """`stamp` (default now) as an ISO-8601 UTC time to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def request_record(*, request_id: str, key_id: str | None, role: str | None, method: str, route: str,
                   model: str | None, status: int, tokens: int, latency_ms: float, moderation: str | None,
                   request_body: bytes, response_body: bytes, full_text: bool) -> dict[str, Any]:
    """What the audit log keeps of one request: who, what, outcome, and hashes of what was said."""
    record: dict[str, Any] = {
        "time": utc(), "request_id": request_id, "key_id": key_id,
        "role": role, "route": f"{method} {route}", "model": model, "status": status, "tokens": tokens,
        "latency_ms": round(latency_ms, 1), "moderation": moderation,
        "prompt_sha256": hashlib.sha256(request_body).hexdigest(),
        "response_sha256": hashlib.sha256(response_body).hexdigest(),
    }
    if full_text:
        record["prompt"] = request_body.decode("utf-8", "replace")
        record["response"] = response_body.decode("utf-8", "replace")
    return record
