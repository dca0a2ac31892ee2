"""The run-directory contract: every stage writes `RUN/<stage>/` and a `manifest.json` beside its outputs.

A manifest records what went in (resolved config and its hash, hashes of upstream artifacts and of
external files), what came out (each output's path and hash), the metrics, the wall time and the package
versions. Downstream stages fingerprint their inputs from upstream manifests, so deciding whether a stage
is up to date never re-reads large files.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from lmsmith.hashing import hash_json, hash_path

MANIFEST = "manifest.json"
_TRACKED_PACKAGES = (
    "lmsmith", "torch", "transformers", "peft", "accelerate", "tokenizers", "pydantic", "sacrebleu",
)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class Manifest:
    stage: str
    config: dict[str, Any]
    config_hash: str
    inputs: dict[str, str]
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    versions: dict[str, str] = field(default_factory=package_versions)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @property
    def fingerprint(self) -> str:
        """What downstream stages depend on: the hashes of this stage's outputs."""
        return hash_json({name: out["hash"] for name, out in self.outputs.items()})

    def write(self, stage_dir: Path) -> Path:
        path = stage_dir / MANIFEST
        path.write_text(json.dumps(self.__dict__, indent=2, ensure_ascii=False, default=str))
        return path

    @classmethod
    def read(cls, stage_dir: Path) -> "Manifest | None":
        path = stage_dir / MANIFEST
        if not path.exists():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError):
            return None

    def outputs_present(self, stage_dir: Path) -> bool:
        """Cheap integrity check (stat only): every output exists with its recorded file count and size."""
        for out in self.outputs.values():
            path = stage_dir / out["path"]
            if not path.exists() or _footprint(path) != (out.get("files"), out.get("bytes")):
                return False
        return True

    def output_path(self, stage_dir: Path, name: str) -> Path:
        """The output's path inside `stage_dir`; a recorded path that leaves the stage folder (absolute, or
        `..` past it) is refused: a swapped manifest must not point a stage at any file. (A symlink the
        stage folder itself holds is the folder owner's choice and is followed.)"""
        import os

        recorded = str(self.outputs[name]["path"])
        path = stage_dir / recorded
        normal = os.path.normpath(recorded)
        if Path(recorded).is_absolute() or normal == ".." or normal.startswith(".." + os.sep):
            from lmsmith.errors import UserError

            raise UserError(f"{Path(stage_dir) / MANIFEST}: output {name!r} points outside the stage folder "
                            f"({recorded}); rerun the stage")
        return path


def checkpoint_root(run_dir: Path, stage: str) -> Path:
    """Where a training stage keeps its resumable checkpoints: outside its folder, so they survive until
    the stage's output is published."""
    return Path(run_dir) / ".checkpoints" / stage


def replace_folder(staging: Path, target: Path) -> None:
    """Put the finished `staging` folder in place of `target`: the old one is moved aside, the new one
    renamed in, then the old one deleted, so a kill at any point leaves a whole folder at `target` or
    beside it (`recover_folder` puts it back)."""
    aside = _aside(target)
    if aside.exists():
        shutil.rmtree(aside)
    if target.exists():
        target.rename(aside)
    staging.rename(target)
    if aside.exists():
        shutil.rmtree(aside)


def recover_folder(target: Path) -> None:
    """Finish a `replace_folder` a kill interrupted: if only the aside copy exists, it is the last good one."""
    aside = _aside(target)
    if not aside.exists():
        return
    if target.exists():
        shutil.rmtree(aside)
    else:
        aside.rename(target)


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.previous")


def describe_outputs(stage_dir: Path, outputs: dict[str, str | Path]) -> dict[str, dict[str, Any]]:
    """Hash each named output (a file or a directory under `stage_dir`)."""
    described = {}
    for name, rel in outputs.items():
        path = stage_dir / rel
        if not path.exists():
            raise FileNotFoundError(f"stage declared output {name!r} at {path}, which was not written")
        files, size = _footprint(path)
        described[name] = {"path": str(Path(rel)), "hash": hash_path(path), "files": files, "bytes": size}
    return described


def _footprint(path: Path) -> tuple[int, int]:
    if path.is_file():
        return 1, path.stat().st_size
    sizes = [p.stat().st_size for p in path.rglob("*") if p.is_file()]
    return len(sizes), sum(sizes)
