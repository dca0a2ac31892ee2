"""W&B and MLflow beside TensorBoard: the real libraries, offline (MLflow's sqlite store in a temp folder,
W&B in offline mode; a stand-in only for online W&B's resume); every row once per step, no secret-looking
params, exact resume without double logging."""

from __future__ import annotations

import glob
import json
import struct
import sys
import time
from types import SimpleNamespace

import pytest

from lmsmith.errors import UserError
from lmsmith.train.config import MlflowConfig, MonitorConfig, TrainingSchedule, WandbConfig
from lmsmith.train.monitor import Alert, RunLog
from lmsmith.train.trackers import flat_params
from test_train_loop import run_sft, sft_upstream  # noqa: F401  (a fixture)

SECRET_PARAMS = {"api_key": "sk-123", "hub": {"hf_token": "hf_abc", "repo": "me/model"}, "db_password": "pw",
                 "client_secret": "s"}


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Nothing may leave the machine: W&B offline, no telemetry, no tracking URI from the environment."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "wandb-dir").mkdir()


def mlflow_monitor(folder) -> MonitorConfig:
    return MonitorConfig(tensorboard=False, mlflow=MlflowConfig(tracking_uri=str(folder), experiment="tests"))


def mlflow_runs(folder):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")  # the documented layout of a folder URI
    experiment = client.get_experiment_by_name("tests")
    return client, client.search_runs([experiment.experiment_id])


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((metric.step, metric.value) for metric in client.get_metric_history(run_id, key))


def test_flat_params_leave_out_secret_looking_fields():
    flat = flat_params({"optim": {"lr": 0.1, "betas": [0.9, 0.95]}, **SECRET_PARAMS, "oversample": {},
                        "method": {"train_tokens": "used"}, "val_max_new_tokens": 48})
    assert flat == {"optim.lr": 0.1, "optim.betas": [0.9, 0.95], "hub.repo": "me/model", "oversample": {},
                    "method.train_tokens": "used", "val_max_new_tokens": 48}


def test_tracker_settings_are_run_control_and_never_force_a_rerun(tmp_path):
    plain = TrainingSchedule()
    tracked = TrainingSchedule(monitor=MonitorConfig(mlflow=MlflowConfig(tracking_uri=str(tmp_path)),
                                                     wandb=WandbConfig(project="p", mode="offline")))
    assert tracked.identity() == plain.identity()


@pytest.mark.parametrize("block, library", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_an_enabled_tracker_without_its_library_is_a_user_error(tmp_path, monkeypatch, block, library):
    monkeypatch.setitem(sys.modules, library, None)  # import now raises ImportError
    monitor = MonitorConfig(**{block: MlflowConfig(tracking_uri=str(tmp_path)) if block == "mlflow" else WandbConfig()})
    with pytest.raises(UserError, match=rf"monitor.{block} needs the {library} library: pip install "):
        RunLog(tmp_path / "metrics.jsonl", None, monitor=monitor, params={})


def test_mlflow_gets_params_once_every_row_at_its_step_and_alerts_as_tags(tmp_path):
    store = tmp_path / "mlruns"
    log = RunLog(tmp_path / "stage" / "metrics.jsonl", None, monitor=mlflow_monitor(store),
                 params={"batch_size": 4, "optim": {"lr": 0.01}, **SECRET_PARAMS})
    for step in (1, 2, 3):
        log.metrics({"step": step, "loss": 3.0 / step, "lr": 0.01, "tokens_per_s": None})
    log.alert(Alert(3, "loss_divergence", "step 3: loss 9", 9.0))
    log.close()
    client, runs = mlflow_runs(store)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert history(client, run.info.run_id, "loss") == [(1, 3.0), (2, 1.5), (3, 1.0)]
    assert "tokens_per_s" not in run.data.metrics  # None is not a number
    assert run.data.params == {"batch_size": "4", "optim.lr": "0.01", "hub.repo": "me/model"}
    assert run.data.tags["alert.000003.loss_divergence"] == "step 3: loss 9"


def test_mlflow_resume_reopens_the_run_and_logs_no_step_twice(tmp_path):
    store, metrics = tmp_path / "mlruns", tmp_path / "stage" / "metrics.jsonl"
    rows = [{"step": step, "loss": 1.0 / step} for step in range(1, 7)]
    killed = RunLog(metrics, None, monitor=mlflow_monitor(store), params={"lr": 1})
    for row in rows[:3]:
        killed.metrics(row)
    saved = killed.tracker_state()  # what the checkpoint at step 3 holds
    for row in rows[3:5]:
        killed.metrics(row)  # logged after the checkpoint, then SIGKILL: no close
    resumed = RunLog(metrics, None, restored_rows=rows[:3], monitor=mlflow_monitor(store), params={"lr": 1},
                     tracker_state=saved)
    for row in rows[3:]:
        resumed.metrics(row)
    resumed.close()
    client, runs = mlflow_runs(store)
    assert [run.info.run_id for run in runs] == [saved["mlflow"]["run_id"]]
    assert history(client, saved["mlflow"]["run_id"], "loss") == [(row["step"], row["loss"]) for row in rows]

    # A run the store no longer has: a fresh run gets the whole restored history.
    other = RunLog(metrics, None, restored_rows=rows[:3], monitor=mlflow_monitor(tmp_path / "elsewhere"),
                   params={"lr": 1}, tracker_state=saved)
    other.close(failed=True)
    client, runs = mlflow_runs(tmp_path / "elsewhere")
    assert runs[0].info.status == "FAILED" and runs[0].info.run_id != saved["mlflow"]["run_id"]
    assert [step for step, _ in history(client, runs[0].info.run_id, "loss")] == [1, 2, 3]


def wandb_records(run_folder, timeout_s: float = 20.0) -> list:
    """The records of an offline run's .wandb file, once its exit record is there: `run.finish()` can
    return before W&B's service has flushed the file."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_log(glob.glob(f"{run_folder}/run-*.wandb")[0])
        if any(record.WhichOneof("record_type") == "exit" for record in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def read_wandb_log(path) -> list:
    """Records of a .wandb file: a LevelDB-style log (32 KiB blocks of checksummed fragments) of protobufs."""
    from wandb.proto import wandb_internal_pb2

    raw = open(path, "rb").read()
    position, block, pending, records = 7, 32768, b"", []  # 7: the ':W&B' header and version
    while position + 7 <= len(raw):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        if kind == 0 or position + 7 + length > len(raw):  # padding, or a record still being written
            break
        pending += raw[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_writes_its_run_folder_with_every_row_and_no_secrets(tmp_path):
    log = RunLog(tmp_path / "stage" / "metrics.jsonl", None, params={"lr": 0.01, **SECRET_PARAMS},
                 monitor=MonitorConfig(tensorboard=False, wandb=WandbConfig(project="tests", mode="offline",
                                                                            tags=["ci"])))
    for step in (1, 2, 3):
        log.metrics({"step": step, "loss": 3.0 / step, "lr": 0.01})
    log.alert(Alert(2, "loss_rising", "step 2: up", 0.5))
    log.close()
    folders = glob.glob(str(tmp_path / "wandb-dir" / "wandb" / "offline-run-*"))
    assert len(folders) == 1
    records = wandb_records(folders[0])
    losses = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json)
                     for item in record.history.item}
            if "loss" in items:
                losses.append((items["_step"], items["loss"]))
    assert losses == [(1, 3.0), (2, 1.5), (3, 1.0)]
    config_keys = {item.key for record in records if record.WhichOneof("record_type") == "run"
                   for item in record.run.config.update}
    assert "lr" in config_keys and "hub.repo" in config_keys
    assert not any(key.split(".")[-1] in ("api_key", "hf_token", "db_password", "client_secret") for key in config_keys)


@pytest.mark.parametrize("mode, resumes", [("online", True), ("offline", False)])
def test_wandb_resume_continues_an_online_run_and_starts_an_offline_one_afresh(tmp_path, monkeypatch, mode, resumes):
    """W&B's side of a resume, with a stand-in for the library (online W&B needs its servers)."""
    inits, logged, updates = [], [], []
    run = SimpleNamespace(id="run-1", starting_step=5 if resumes else 0, summary={}, alert=lambda **_: None,
                          log=lambda data, step: logged.append(step), finish=lambda exit_code: None,
                          config=SimpleNamespace(update=lambda params, allow_val_change: updates.append(params)))
    library = SimpleNamespace(init=lambda **settings: inits.append(settings) or run, Table=dict,
                              errors=SimpleNamespace(Error=RuntimeError), AlertLevel=SimpleNamespace(WARN="warn"))
    monkeypatch.setitem(sys.modules, "wandb", library)
    monkeypatch.setenv("WANDB_MODE", mode)
    rows = [{"step": step, "loss": 1.0 / step} for step in range(1, 8)]
    log = RunLog(tmp_path / "metrics.jsonl", None, restored_rows=rows[:3], params={"lr": 1},
                 monitor=MonitorConfig(tensorboard=False, wandb=WandbConfig()),
                 tracker_state={"wandb": {"run_id": "run-1"}})
    for row in rows[3:]:
        log.metrics(row)
    log.close()
    if resumes:  # W&B already holds steps 1-4 (the killed run logged past its checkpoint at 3)
        assert (inits[0]["id"], inits[0]["resume"], inits[0]["config"]) == ("run-1", "allow", None)
        assert updates == [{"lr": 1}] and logged == [5, 6, 7]
    else:
        assert (inits[0]["id"], inits[0]["config"]) == (None, {"lr": 1}) and logged == list(range(1, 8))


def test_training_with_mlflow_resumes_into_the_same_run(tmp_path):
    """Through the loop: a run that crashes after its step-3 checkpoint, then resumes, leaves one MLflow
    run with each step once, the stage's config as params, and status FINISHED."""
    from test_train_loop import schedule, tiny

    from lmsmith.train.data import Example, StepPlan
    from lmsmith.train.loop import train

    class CrashAt:
        def __init__(self, plan, step):
            self.plan, self.step = plan, step

        def __iter__(self):
            for step, batches in enumerate(self.plan, start=1):
                if step == self.step:
                    raise RuntimeError("power cut")
                yield batches

    rows = [Example(input_ids=[3, 4, 5] * 4, labels=[3, 4, 5] * 4) for _ in range(16)]
    plan = StepPlan(rows, pad_id=0, batch_size=4, epochs=10, max_steps=6)
    store, checkpoints = tmp_path / "mlruns", tmp_path / "checkpoints"
    config = schedule(max_steps=6, val_every=None, checkpoint_every=3, monitor=mlflow_monitor(store))
    with pytest.raises(RuntimeError, match="power cut"):
        train(tiny(), CrashAt(plan, 6), 6, config, tmp_path / "first", checkpoint_dir=checkpoints)
    client, runs = mlflow_runs(store)
    assert runs[0].info.status == "FAILED"
    assert [step for step, _ in history(client, runs[0].info.run_id, "loss")] == [1, 2, 3, 4, 5]

    resumed = config.model_copy(update={"resume": True})
    train(tiny(), plan, 6, resumed, tmp_path / "second", checkpoint_dir=checkpoints)
    client, runs = mlflow_runs(store)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = history(client, runs[0].info.run_id, "loss")
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 6]
    expected = [json.loads(line) for line in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [(row["step"], row["loss"]) for row in expected]
    assert runs[0].data.params["optim.lr"] == str(config.optim.lr) and runs[0].data.params["max_steps"] == "6"


@pytest.mark.slow
def test_a_dp_sgd_stage_logs_to_both_trackers(sft_upstream, tmp_path, monkeypatch):
    """DP-SGD through the pipeline: MLflow gets ε per row; W&B's offline run lands in the stage folder."""
    monkeypatch.delenv("WANDB_DIR")
    monitor = MonitorConfig(tensorboard=False, wandb=WandbConfig(project="tests", mode="offline"),
                            mlflow=MlflowConfig(tracking_uri=str(tmp_path / "mlruns"), experiment="tests"))
    run_sft(sft_upstream, tmp_path, method={"name": "lora", "r": 4, "train_tokens": "none"},
            privacy={"noise_multiplier": 1.0, "delta": 1e-3}, monitor=monitor)
    client, runs = mlflow_runs(tmp_path / "mlruns")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [step for step, _ in history(client, runs[0].info.run_id, "dp_epsilon")] == [1, 2, 3]
    assert runs[0].data.params["privacy.delta"] == "0.001"
    offline_runs = glob.glob(str(tmp_path / "sft" / "wandb" / "offline-run-*"))
    assert len(offline_runs) == 1 and glob.glob(f"{offline_runs[0]}/run-*.wandb")


@pytest.mark.parametrize("uri", ["postgresql://user:pw@db.internal/mlflow", "https://me:token@mlflow.example.com"])
def test_a_tracking_uri_with_credentials_is_refused(uri):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="MLFLOW_TRACKING_USERNAME"):
        MlflowConfig(tracking_uri=uri)
    assert MlflowConfig(tracking_uri="postgresql://db.internal/mlflow").tracking_uri  # no credentials: fine
