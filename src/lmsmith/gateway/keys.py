"""API keys: created once, stored only as a hash, with a role, model scopes, limits, a quota and an expiry.

The store is the gateway's database (`lmsmith.gateway.db`: SQLite under the state folder, or a URL). A
key reads `lms_<id>_<secret>`: the id finds the row, the secret's SHA-256 is compared in constant time;
the secret itself is never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from lmsmith.errors import UserError

ROLES = ("admin", "operator", "user", "viewer")
KEY_PATTERN = re.compile(r"^lms_([0-9a-f]{12})_([A-Za-z0-9_-]{20,})$")


@dataclass
class ApiKey:
    """A key's row, without its secret."""

    id: str
    name: str
    role: str
    models: list[str] = field(default_factory=list)  # empty: every model
    rpm: Optional[int] = None
    tpm: Optional[int] = None
    concurrency: Optional[int] = None
    quota_tokens: Optional[int] = None
    used_tokens: int = 0
    created_at: float = 0.0
    expires_at: Optional[float] = None
    revoked_at: Optional[float] = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > time.time())

    def allows_model(self, model: str) -> bool:
        return not self.models or model in self.models  # adapters are models of their own name

    def public(self) -> dict:
        """What `keys list` and `GET /admin/keys` show."""
        def when(stamp: Optional[float]) -> Optional[str]:
            return None if stamp is None else datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="seconds")

        return {"id": self.id, "name": self.name, "role": self.role, "models": self.models, "rpm": self.rpm,
                "tpm": self.tpm, "concurrency": self.concurrency, "quota_tokens": self.quota_tokens,
                "used_tokens": self.used_tokens, "created": when(self.created_at), "expires": when(self.expires_at),
                "revoked": when(self.revoked_at), "active": self.active}


def parse_duration(text: str) -> float:
    """Seconds in '30d', '12h', '45m' or '90s'."""
    match = re.fullmatch(r"(\d{1,6})([dhms])", text.strip())
    if not match:
        raise UserError(f"--expires {text!r}: expected up to six digits and d, h, m or s (e.g. 30d)")
    return int(match.group(1)) * {"d": 86400, "h": 3600, "m": 60, "s": 1}[match.group(2)]


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def state_dir(given: str | Path | None) -> Path:
    """`--state-dir`, else `LMSMITH_STATE_DIR`, else ~/.lmsmith."""
    import os

    chosen = given or os.environ.get("LMSMITH_STATE_DIR") or Path.home() / ".lmsmith"
    return Path(chosen).expanduser()


class KeyStore:
    """The key table. `url`: a SQLAlchemy URL; default SQLite in `folder`."""

    def __init__(self, folder: Path | None = None, url: str | None = None):
        from lmsmith.gateway.db import open_database

        self._engine = open_database(folder, url)

    def close(self) -> None:
        self._engine.dispose()

    # ----- writes -----

    def create(self, name: str, role: str, models: list[str] = (), rpm: int | None = None, tpm: int | None = None,
               concurrency: int | None = None, quota_tokens: int | None = None,
               expires_in_s: float | None = None) -> tuple[str, ApiKey]:
        """(the key, shown once; its row)."""
        from sqlalchemy import text

        if role not in ROLES:
            raise UserError(f"--role {role!r}: one of {', '.join(ROLES)}")
        for value, flag, most in ((rpm, "--rpm", 2**31 - 1), (tpm, "--tpm", 2**31 - 1),
                                  (concurrency, "--concurrency", 2**31 - 1), (quota_tokens, "--quota", 2**62)):
            if value is not None and not 1 <= value <= most:
                raise UserError(f"{flag}: must be between 1 and {most:,} (leave it out for no limit)")
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        now = time.time()
        row = ApiKey(key_id, name, role, sorted(set(models)), rpm, tpm, concurrency, quota_tokens, 0, now,
                     None if expires_in_s is None else now + expires_in_s)
        with self._engine.begin() as db:
            db.execute(text(
                "INSERT INTO api_keys (id, name, secret_sha256, role, models, rpm, tpm, concurrency, quota_tokens, "
                "used_tokens, created_at, expires_at) VALUES (:id, :name, :sha, :role, :models, :rpm, :tpm, "
                ":concurrency, :quota, 0, :created, :expires)"),
                {"id": key_id, "name": name, "sha": _digest(secret), "role": role, "models": json.dumps(row.models),
                 "rpm": rpm, "tpm": tpm, "concurrency": concurrency, "quota": quota_tokens, "created": now,
                 "expires": row.expires_at})
        return f"lms_{key_id}_{secret}", row

    def revoke(self, key_id: str) -> ApiKey:
        from sqlalchemy import text

        self.get(key_id)
        with self._engine.begin() as db:
            db.execute(text("UPDATE api_keys SET revoked_at = :now WHERE id = :id AND revoked_at IS NULL"),
                       {"now": time.time(), "id": key_id})
        return self.get(key_id)

    def rotate(self, key_id: str) -> tuple[str, ApiKey]:
        """A new secret for the same id, role, scopes and counters; the old secret stops working at once."""
        from sqlalchemy import text

        key = self.get(key_id)
        if key.revoked_at is not None:
            raise UserError(f"key {key_id} is revoked; create a new one")
        secret = secrets.token_urlsafe(32)
        with self._engine.begin() as db:
            db.execute(text("UPDATE api_keys SET secret_sha256 = :sha WHERE id = :id"),
                       {"sha": _digest(secret), "id": key_id})
        return f"lms_{key_id}_{secret}", key

    def add_usage(self, key_id: str, tokens: int) -> None:
        from sqlalchemy import text

        if tokens > 0:
            with self._engine.begin() as db:
                db.execute(text("UPDATE api_keys SET used_tokens = used_tokens + :n WHERE id = :id"),
                           {"n": int(tokens), "id": key_id})

    # ----- reads -----

    def _rows(self, where: str = "", params: dict | None = None) -> list[ApiKey]:
        from sqlalchemy import text

        with self._engine.connect() as db:
            rows = db.execute(text(
                "SELECT id, name, role, models, rpm, tpm, concurrency, quota_tokens, used_tokens, created_at, "
                f"expires_at, revoked_at FROM api_keys {where} ORDER BY created_at"), params or {}).all()
        return [ApiKey(r[0], r[1], r[2], json.loads(r[3]), *r[4:]) for r in rows]

    def list(self) -> list[ApiKey]:
        return self._rows()

    def get(self, key_id: str) -> ApiKey:
        found = self._rows("WHERE id = :id", {"id": key_id})
        if not found:
            raise UserError(f"no key {key_id!r}")
        return found[0]

    def has_keys(self) -> bool:
        return any(key.active for key in self._rows())

    def authenticate(self, presented: str) -> Optional[ApiKey]:
        """The active key `presented` is, or None (unknown, wrong secret, revoked or expired)."""
        from sqlalchemy import text

        match = KEY_PATTERN.match(presented.strip())
        if not match:
            return None
        key_id, secret = match.groups()
        with self._engine.connect() as db:
            stored = db.execute(text("SELECT secret_sha256 FROM api_keys WHERE id = :id"), {"id": key_id}).scalar()
        if stored is None or not hmac.compare_digest(stored, _digest(secret)):
            return None
        key = self.get(key_id)
        return key if key.active else None
