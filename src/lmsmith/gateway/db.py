"""The gateway's database: keys, the model registry and its change log, through SQLAlchemy Core.

SQLite under the server's state folder by default; any SQLAlchemy URL (Postgres with its driver) when
replicas share one. Schema changes are plain SQL per version (`MIGRATIONS`), applied in order on open and
recorded in `lmsmith_schema`.
"""

from __future__ import annotations

from pathlib import Path

DATABASE = "lmsmith.db"
# version -> statements that bring the previous version's schema to it.
MIGRATIONS: dict[int, list[str]] = {
    1: ["""CREATE TABLE api_keys (
        id VARCHAR(12) PRIMARY KEY, name VARCHAR(200) NOT NULL, secret_sha256 VARCHAR(64) NOT NULL,
        role VARCHAR(16) NOT NULL, models TEXT NOT NULL, rpm INTEGER, tpm INTEGER, concurrency INTEGER,
        quota_tokens BIGINT, used_tokens BIGINT NOT NULL DEFAULT 0, created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION, revoked_at DOUBLE PRECISION)"""],
    2: ["""CREATE TABLE model_versions (
        name VARCHAR(200) NOT NULL, version INTEGER NOT NULL, run_dir TEXT NOT NULL, model_path TEXT NOT NULL,
        variant VARCHAR(200), manifest_hash VARCHAR(64) NOT NULL, eval_scores TEXT NOT NULL,
        note TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (name, version))""",
        "CREATE TABLE model_current (name VARCHAR(200) PRIMARY KEY, version INTEGER NOT NULL)",
        """CREATE TABLE registry_changes (
        id INTEGER PRIMARY KEY, at DOUBLE PRECISION NOT NULL, actor VARCHAR(200) NOT NULL,
        action VARCHAR(16) NOT NULL, name VARCHAR(200) NOT NULL, version INTEGER NOT NULL,
        previous INTEGER)"""],
    3: ["""CREATE TABLE request_texts (
        request_id VARCHAR(64) PRIMARY KEY, key_id VARCHAR(12), model VARCHAR(200), route VARCHAR(64) NOT NULL,
        prompt TEXT NOT NULL, answer TEXT NOT NULL, finish_reason VARCHAR(32), created_at DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE feedback (
        id INTEGER PRIMARY KEY, request_id VARCHAR(64) NOT NULL, key_id VARCHAR(12), rating INTEGER NOT NULL,
        correction TEXT, comment TEXT, created_at DOUBLE PRECISION NOT NULL)"""],
}


def open_database(folder: Path | None = None, url: str | None = None):
    """A migrated SQLAlchemy engine: `url`, else SQLite in `folder`."""
    from sqlalchemy import create_engine, text

    if url is None:
        if folder is None:
            raise ValueError("the gateway database needs a state folder or a URL")
        Path(folder).mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{Path(folder) / DATABASE}"
    engine = create_engine(url, future=True)
    with engine.begin() as db:
        db.execute(text("CREATE TABLE IF NOT EXISTS lmsmith_schema (version INTEGER NOT NULL)"))
        current = db.execute(text("SELECT MAX(version) FROM lmsmith_schema")).scalar() or 0
        for version in sorted(v for v in MIGRATIONS if v > current):
            for statement in MIGRATIONS[version]:
                db.execute(text(statement))
            db.execute(text("INSERT INTO lmsmith_schema (version) VALUES (:v)"), {"v": version})
    return engine
