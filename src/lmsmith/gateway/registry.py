"""The model registry: each served name maps to numbered versions (a run, its manifest hash, its eval
scores), one of which is current; promote and rollback move it, and every move is in the change log.

`lmsmith serve --registry NAME` serves NAME's current version and follows the registry: a promote or a
rollback (from the CLI, from another replica, or `POST /admin/registry/...`) loads the new version beside
the old one and switches requests to it without a restart (`lmsmith.serve.client.LocalClient.swap`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lmsmith.errors import UserError
from lmsmith.gateway.audit import utc


@dataclass
class ModelVersion:
    name: str
    version: int
    run_dir: str
    model_path: str
    variant: Optional[str]
    manifest_hash: str
    eval_scores: dict[str, float] = field(default_factory=dict)
    note: str = ""
    created_at: float = 0.0

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "run": self.run_dir, "variant": self.variant,
                "manifest_hash": self.manifest_hash, "eval_scores": self.eval_scores, "note": self.note,
                "created": utc(self.created_at)}


def describe_run(run: str | Path, variant: Optional[str]) -> tuple[Path, str, dict[str, float]]:
    """(the model folder, the hash of the manifest that published it, the run's eval scores)."""
    from lmsmith.artifacts import Manifest
    from lmsmith.models import resolve_model

    run_dir = Path(run).expanduser().resolve()
    if not (run_dir / "sft" / "manifest.json").is_file():
        raise UserError(f"{run}: not a run folder (no sft/manifest.json); the registry versions runs")
    model = resolve_model(run_dir, variant).path
    published = Manifest.read(run_dir / ("compress" if variant else "sft"))
    manifest_hash = published.fingerprint if published is not None else ""
    scores: dict[str, float] = {}
    evaluated = Manifest.read(run_dir / "eval")
    if evaluated is not None:
        label = variant if variant else "tuned"
        scores = {key.removeprefix(f"{label}."): value for key, value in evaluated.metrics.items()
                  if key.startswith(f"{label}.") and isinstance(value, (int, float)) and not isinstance(value, bool)}
    return model, manifest_hash, scores


class Registry:
    def __init__(self, folder: Path | None = None, url: str | None = None, audit: Any = None):
        from lmsmith.gateway.db import open_database

        self._engine = open_database(folder, url)
        self.audit = audit  # an AuditLog: every change is also an audit record

    def close(self) -> None:
        self._engine.dispose()

    def register(self, name: str, run: str | Path, variant: Optional[str] = None, note: str = "",
                 actor: str = "cli") -> ModelVersion:
        """A new version of `name` from a run (or its compressed variant); the first becomes current."""
        from sqlalchemy import text

        model, manifest_hash, scores = describe_run(run, variant)
        with self._engine.begin() as db:
            latest = db.execute(text("SELECT MAX(version) FROM model_versions WHERE name = :n"), {"n": name}).scalar()
            version = (latest or 0) + 1
            entry = ModelVersion(name, version, str(Path(run).expanduser().resolve()), str(model), variant,
                                 manifest_hash, scores, note, time.time())
            db.execute(text(
                "INSERT INTO model_versions (name, version, run_dir, model_path, variant, manifest_hash, eval_scores, "
                "note, created_at) VALUES (:n, :v, :r, :m, :var, :h, :s, :note, :t)"),
                {"n": name, "v": version, "r": entry.run_dir, "m": entry.model_path, "var": variant,
                 "h": manifest_hash, "s": json.dumps(scores), "note": note, "t": entry.created_at})
        self._change(actor, "register", name, version, None)
        if latest is None:
            self._set_current(name, version, actor, "promote")
        return entry

    def versions(self, name: Optional[str] = None) -> list[ModelVersion]:
        from sqlalchemy import text

        where = "WHERE name = :n" if name else ""
        with self._engine.connect() as db:
            rows = db.execute(text(
                "SELECT name, version, run_dir, model_path, variant, manifest_hash, eval_scores, note, created_at "
                f"FROM model_versions {where} ORDER BY name, version"), {"n": name}).all()
        return [ModelVersion(*row[:6], json.loads(row[6]), row[7], row[8]) for row in rows]

    def current(self, name: str) -> ModelVersion:
        from sqlalchemy import text

        with self._engine.connect() as db:
            version = db.execute(text("SELECT version FROM model_current WHERE name = :n"), {"n": name}).scalar()
        if version is None:
            known = sorted({v.name for v in self.versions()})
            raise UserError(f"registry: no model named {name!r} ({', '.join(known) or 'the registry is empty'})")
        return self._version(name, version)

    def _version(self, name: str, version: int) -> ModelVersion:
        found = [v for v in self.versions(name) if v.version == version]
        if not found:
            have = ", ".join(str(v.version) for v in self.versions(name)) or "none"
            raise UserError(f"registry: {name} has no version {version} (versions: {have})")
        return found[0]

    def promote(self, name: str, version: int, actor: str = "cli") -> ModelVersion:
        self._version(name, version)
        self._set_current(name, version, actor, "promote")
        return self.current(name)

    def rollback(self, name: str, actor: str = "cli") -> ModelVersion:
        """Back to the version that was current before the present one."""
        from sqlalchemy import text

        present = self.current(name).version
        with self._engine.connect() as db:
            previous = db.execute(text(
                "SELECT previous FROM registry_changes WHERE name = :n AND action IN ('promote', 'rollback') "
                "AND version = :v AND previous IS NOT NULL ORDER BY id DESC LIMIT 1"), {"n": name, "v": present}).scalar()
        if previous is None:
            raise UserError(f"registry: {name} v{present} has no earlier current version to roll back to")
        self._set_current(name, previous, actor, "rollback")
        return self.current(name)

    def changes(self, name: Optional[str] = None) -> list[dict[str, Any]]:
        from sqlalchemy import text

        where = "WHERE name = :n" if name else ""
        with self._engine.connect() as db:
            rows = db.execute(text(f"SELECT at, actor, action, name, version, previous FROM registry_changes {where} "
                                   "ORDER BY id"), {"n": name}).all()
        return [{"time": utc(r[0]), "actor": r[1], "action": r[2],
                 "name": r[3], "version": r[4], "previous": r[5]} for r in rows]

    def _set_current(self, name: str, version: int, actor: str, action: str) -> None:
        from sqlalchemy import text

        with self._engine.begin() as db:
            previous = db.execute(text("SELECT version FROM model_current WHERE name = :n"), {"n": name}).scalar()
            if previous is None:
                db.execute(text("INSERT INTO model_current (name, version) VALUES (:n, :v)"), {"n": name, "v": version})
            else:
                db.execute(text("UPDATE model_current SET version = :v WHERE name = :n"), {"n": name, "v": version})
        self._change(actor, action, name, version, previous)

    def _change(self, actor: str, action: str, name: str, version: int, previous: Optional[int]) -> None:
        from sqlalchemy import text

        with self._engine.begin() as db:
            db.execute(text("INSERT INTO registry_changes (at, actor, action, name, version, previous) "
                            "VALUES (:t, :a, :act, :n, :v, :p)"),
                       {"t": time.time(), "a": actor, "act": action, "n": name, "v": version, "p": previous})
        if self.audit is not None:
            self.audit.append({"time": utc(), "event": f"registry.{action}",
                               "actor": actor, "model": name, "version": version, "previous": previous})
