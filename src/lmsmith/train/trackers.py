"""Optional experiment trackers beside TensorBoard: Weights & Biases (`wandb`) and MLflow (`mlflow`).

The libraries do the work (runs, storage, upload, their UIs); this module decides what each receives:
the stage's config once as flat params, every metrics row at its step, and every alert. Fields whose
name has the word key, token, secret or password are never sent. Each library is imported only when its
block is set in `monitor`.

A resumed run must not log a step twice, so each tracker's run id rides in the checkpoint (the loop's
state.json; the stage folder itself is rebuilt by the rerun, the checkpoint is what a resume reads):

- MLflow reopens that run when the tracking store still has it, asks it for the last step it logged
  and sends only later rows (a killed run may have logged past its checkpoint; the resumed run
  recomputes those steps bit for bit). Alerts are tags keyed by step and kind, so writing one again
  changes nothing. When the run is gone (another store, deleted), a new run gets the params and all
  restored rows.
- W&B online resumes the same run (`resume="allow"`) and skips rows before the step W&B reports as
  the run's next. Offline, W&B cannot see the earlier run, so a new offline run gets every row.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

from lmsmith.errors import UserError

SECRET_MARKERS = ("key", "token", "secret", "password")
INSTALL_HINT = "(or pip install 'lmsmith[tracking]')"
MLFLOW_BATCH = 100  # MLflow's per-request limit on params
MLFLOW_VALUE_CHARS = 6000  # MLflow's longest param value


def _require(module: str, setting: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{setting} needs the {module} library: pip install {package} {INSTALL_HINT}") from None


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config as dotted names → values, without any field whose name looks like it holds a secret."""
    flat: dict[str, Any] = {}
    for name, value in config.items():
        # Whole words of the name: `api_key` and `hf_token` go, `train_tokens` and `max_new_tokens` stay.
        words = str(name).lower().replace("-", "_").split("_")
        if any(marker in words for marker in SECRET_MARKERS):
            continue
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def mlflow_store(tracking_uri: str | None) -> tuple[str, str | None]:
    """(tracking URI, artifact location for new experiments): a plain folder becomes an sqlite
    database inside it with artifacts beside it; URIs with a scheme pass through unchanged."""
    if tracking_uri is None:
        from mlflow.tracking import get_tracking_uri

        return get_tracking_uri(), None
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", tracking_uri):
        return tracking_uri, None
    folder = Path(tracking_uri).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


class MlflowTracker:
    """One MLflow run, driven through `mlflow.tracking.MlflowClient` with explicit run ids, so no global
    active run leaks between stages trained in one process."""

    def __init__(self, config, params: dict[str, Any], saved: dict[str, Any] | None):
        _require("mlflow", "monitor.mlflow", "mlflow-skinny")
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri, artifacts = mlflow_store(config.tracking_uri)
        scheme = uri.split(":", 1)[0].split("+", 1)[0]
        if scheme in ("sqlite", "postgresql", "mysql", "mssql"):
            missing = [name for name in ("sqlalchemy", "alembic") if importlib.util.find_spec(name) is None]
            if missing:
                raise UserError(f"monitor.mlflow: the database store {uri} needs {' and '.join(missing)}: "
                                f"pip install {' '.join(missing)} {INSTALL_HINT}")
        if scheme == "file":
            # MLflow 3 refuses its file store unless told it is wanted; a file: URI in the recipe says so.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        try:
            experiment = self.client.get_experiment_by_name(config.experiment)
        except MlflowException as error:
            raise UserError(f"monitor.mlflow: cannot open the tracking store {uri}: {error.message}") from None
        if experiment is not None and experiment.lifecycle_stage != "active":
            raise UserError(f"monitor.mlflow: experiment {config.experiment!r} is deleted in {uri}; restore it or "
                            "pick another name")
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(config.experiment, artifact_location=artifacts))
        run = self._reopen((saved or {}).get("run_id"), experiment_id, MlflowException)
        if run is not None:
            self.run_id = run.info.run_id
            self.last_step = max((metric.step for key in run.data.metrics
                                  for metric in self.client.get_metric_history(self.run_id, key)), default=0)
            self.client.update_run(self.run_id, status="RUNNING")
            return
        self.run_id = self.client.create_run(experiment_id, run_name=config.run_name).info.run_id
        self.last_step = 0
        entries = [Param(re.sub(r"[^\w./\- :]", "_", name), self._text(value)[:MLFLOW_VALUE_CHARS])
                   for name, value in params.items()]
        for start in range(0, len(entries), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=entries[start:start + MLFLOW_BATCH])

    def _reopen(self, run_id: str | None, experiment_id: str, not_found: type[Exception]):
        if not run_id:
            return None
        try:
            run = self.client.get_run(run_id)
        except not_found:
            return None
        if run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
            return None
        return run

    @staticmethod
    def _text(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    def log_row(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        if row["step"] <= self.last_step:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, row["step"]) for key, value in _numbers(row).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        self.last_step = row["step"]

    def log_alert(self, alert: dict[str, Any], live: bool) -> None:
        self.client.set_tag(self.run_id, f"alert.{alert['step']:06d}.{alert['kind']}", alert["message"])

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def close(self, alerts: list[dict[str, Any]], failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandbTracker:
    """One Weights & Biases run through `wandb.init`, `run.log` and `run.finish`; new alerts also go
    through `run.alert`, which notifies by W&B's own settings (e-mail, Slack) when online."""

    def __init__(self, config, params: dict[str, Any], saved: dict[str, Any] | None, files_dir: Path):
        self.wandb = _require("wandb", "monitor.wandb", "wandb")
        online = (config.mode or os.environ.get("WANDB_MODE", "online")) == "online"
        run_id = (saved or {}).get("run_id") if online else None
        try:
            self.run = self.wandb.init(
                project=config.project, entity=config.entity, name=config.run_name, mode=config.mode,
                tags=config.tags or None, config=None if run_id else params, id=run_id,
                resume="allow" if run_id else None, dir=None if os.environ.get("WANDB_DIR") else str(files_dir),
            )
        except self.wandb.errors.Error as error:  # not logged in, unknown entity, no network when online
            raise UserError(f"monitor.wandb: W&B could not start a run: {error}") from None
        if run_id:
            # The resumed run holds the params already, and run-control fields (resume itself) may differ.
            self.run.config.update(params, allow_val_change=True)
        self.first_step = self.run.starting_step  # > 0 only for a resumed online run

    def log_row(self, row: dict[str, Any]) -> None:
        if row["step"] >= self.first_step:
            self.run.log(_numbers(row), step=row["step"])

    def log_alert(self, alert: dict[str, Any], live: bool) -> None:
        if live:
            self.run.alert(title=f"{alert['kind']} at step {alert['step']}", text=alert["message"],
                           level=self.wandb.AlertLevel.WARN)

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run.id}

    def close(self, alerts: list[dict[str, Any]], failed: bool) -> None:
        if alerts:
            columns = ["step", "kind", "message", "value"]
            self.run.summary["alerts"] = self.wandb.Table(
                columns=columns, data=[[alert.get(column) for column in columns] for alert in alerts])
        self.run.finish(exit_code=1 if failed else 0)


def open_trackers(monitor, config: dict[str, Any], saved: dict[str, Any], files_dir: Path,
                  rows: Sequence[dict[str, Any]], alerts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The trackers `monitor` enables (name → tracker), each already holding the restored history."""
    params = flat_params(config)
    trackers: dict[str, Any] = {}
    if monitor.mlflow is not None:
        trackers["mlflow"] = MlflowTracker(monitor.mlflow, params, saved.get("mlflow"))
    if monitor.wandb is not None:
        trackers["wandb"] = WandbTracker(monitor.wandb, params, saved.get("wandb"), files_dir)
    for tracker in trackers.values():
        for row in rows:
            tracker.log_row(row)
        for alert in alerts:
            tracker.log_alert(alert, live=False)
    return trackers
