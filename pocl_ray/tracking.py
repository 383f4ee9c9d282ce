"""Experiment trackers (MLflow, TensorBoard, Weights & Biases): where a run's numbers also go.

metrics.jsonl, selection.json, results.json and the report stay the record; a tracker shows the same
numbers in the tool users already compare runs in. `output.trackers` picks any of the three; what
is logged is `pocl_ray.tracked`.

Run tree. One pipeline (or sweep) invocation is one parent run (`start`); each step (teacher
fine-tuning, scoring, each compared run, the teacher's evaluation) is a child under it:
  MLflow        a run tagged mlflow.parentRunId = the parent's id (nested under it in the UI)
  W&B           a run in the group named after the parent (the group view sets them side by side)
  TensorBoard   LOG_DIR/<group>/ holds the parent's events, LOG_DIR/<group>/<child>/ each child's
A child is made on the driver as a handle (`Run.child`: a small dict holding the MLflow run id, the
W&B run id, the TensorBoard folder) that any process attaches to (`attach`): the coordinator actor
logs a training run's steps into it, the driver its evaluation afterwards. Processes take turns on
a child, never write it at once; only the last one finishes it (`close(status)`), the others detach
(`close()`).

Robustness. Every tracker call runs on the Run's own thread, in order, so a slow or dead server
never stalls a training step. The first failure of a tracker prints one warning and switches that
tracker off for the rest of the run (children made after it leave it out). An http(s) MLflow server
is probed with a TCP connect before the first call: MLflow's client retries a refused connection
for minutes. Credentials are never logged (`tracked.loggable_params`) and never travel in a handle:
each tool reads them on each node from its own environment variables or files.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pocl_ray import storage
from pocl_ray.config import ConfigError, RunConfig, is_uri

if TYPE_CHECKING:  # Ray only where a sweep makes its callbacks
    from ray.tune import Callback

# The pip extra of each tracker and the module its library installs.
EXTRAS = {"mlflow": "mlflow", "tensorboard": "tensorboard", "wandb": "wandb"}
# How long `close` waits for the calls still queued (a server that answers slowly) before giving up on them.
CLOSE_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 5.0
MLFLOW_BATCH = 100  # params (MLflow's limit per log_batch; metrics allow 1000)
MLFLOW_PARAM_CHARS = 6000  # MLflow's longest param value


def check_trackers(cfg: RunConfig, env: Mapping[str, str] = os.environ) -> None:
    """A ConfigError naming the extra to install for each tracker in output.trackers whose library is missing,
    or, when output.dir is in object storage, the setting of a tracker whose default store would be there."""
    if is_uri(cfg.output.dir):
        settings(cfg, env)
    missing = [t for t in cfg.output.trackers if importlib.util.find_spec(EXTRAS[t]) is None]
    if missing:
        raise ConfigError(
            "output.trackers: "
            + "; ".join(f"{t!r} needs the {EXTRAS[t]} library: pip install 'pocl-ray[{t}]'" for t in missing)
        )


def settings(cfg: RunConfig, env: Mapping[str, str] = os.environ) -> dict[str, dict]:
    """Each configured tracker's settings: the config's value, else the tool's own environment
    variable, else the default beside the run's outputs (`_beside`). Resolved once, on the driver: Ray
    workers need not share the driver's environment."""
    resolved: dict[str, dict] = {}
    for tracker in cfg.output.trackers:
        if tracker == "mlflow":
            m = cfg.output.mlflow
            tracking_uri = m.tracking_uri or env.get("MLFLOW_TRACKING_URI")
            resolved[tracker] = {
                "tracking_uri": tracking_uri or f"sqlite:///{_beside(cfg, 'mlflow.db', 'output.mlflow.tracking_uri')}",
                "experiment": m.experiment or env.get("MLFLOW_EXPERIMENT_NAME") or cfg.name,
            }
        elif tracker == "tensorboard":
            log_dir = cfg.output.tensorboard.log_dir
            default = _beside(cfg, "tensorboard", "output.tensorboard.log_dir") if not log_dir else None
            resolved[tracker] = {"log_dir": str(Path(log_dir).resolve() if log_dir else default)}
        else:
            w = cfg.output.wandb
            resolved[tracker] = {
                "project": w.project or env.get("WANDB_PROJECT") or "pocl-ray",
                "entity": w.entity or env.get("WANDB_ENTITY"),
                "mode": w.mode or env.get("WANDB_MODE") or "online",
                "dir": str(Path(w.dir or env.get("WANDB_DIR") or _beside(cfg, "", "output.wandb.dir")).resolve()),
            }
    return resolved


def _beside(cfg: RunConfig, name: str, setting: str) -> Path:
    """OUTPUT/name: a tracker's default store beside a local output.dir. An output.dir in object storage
    cannot hold it (a database, event files appended to): a ConfigError naming the setting to give."""
    if is_uri(cfg.output.dir):
        raise ConfigError(
            f"{setting}: not set, and its default lies beside the outputs, in output.dir ({cfg.output.dir}), "
            "which is in object storage; set a local folder"
            + (" or a server's URI (or $MLFLOW_TRACKING_URI)" if "mlflow" in setting else "")
        )
    return Path(cfg.output.dir).resolve() / name


def _reachable(uri: str) -> None:
    """Raise ConnectionError when an http(s) tracking server does not accept a TCP connection."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S):
            return
    except OSError as err:
        raise ConnectionError(f"MLflow server {parsed.hostname}:{port} is not reachable ({err})") from None


def _local_artifacts(uri: str) -> str | None:
    """For a SQLite store: the folder beside the database that new experiments keep their artifacts
    in (MLflow's default, ./mlruns, would land in whatever folder the driver runs in)."""
    if not uri.startswith("sqlite:///"):
        return None
    return str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts")


# ---------------------------------------------------------------------------------------------
# One tracker each: attach to a handle part, log, make a child's part, close


class _MLflow:
    name = "mlflow"

    def __init__(self, part: dict):
        from mlflow.tracking import MlflowClient

        _reachable(part["tracking_uri"])
        self.part = part
        self.client = MlflowClient(part["tracking_uri"])

    @classmethod
    def parent_part(cls, conf: dict, name: str, kind: str, group: str) -> dict:
        from mlflow.tracking import MlflowClient

        _reachable(conf["tracking_uri"])
        client = MlflowClient(conf["tracking_uri"])
        experiment = client.get_experiment_by_name(conf["experiment"])
        experiment_id = (
            experiment.experiment_id
            if experiment
            else client.create_experiment(conf["experiment"], artifact_location=_local_artifacts(conf["tracking_uri"]))
        )
        run = client.create_run(experiment_id, run_name=name, tags={"pocl_ray.kind": kind})
        return {**conf, "experiment_id": experiment_id, "run_id": run.info.run_id}

    def child_part(self, name: str, kind: str) -> dict:
        tags = {"mlflow.parentRunId": self.part["run_id"], "pocl_ray.kind": kind}
        run = self.client.create_run(self.part["experiment_id"], run_name=name, tags=tags)
        return {**self.part, "run_id": run.info.run_id}

    def params(self, values: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:MLFLOW_PARAM_CHARS]) for k, v in values.items()]
        for i in range(0, len(items), MLFLOW_BATCH):
            self.client.log_batch(self.part["run_id"], params=items[i : i + MLFLOW_BATCH])

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in values.items()]
        for i in range(0, len(items), 10 * MLFLOW_BATCH):
            self.client.log_batch(self.part["run_id"], metrics=items[i : i + 10 * MLFLOW_BATCH])

    def artifacts(self, path: Path, folder: str) -> None:
        log = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        log(self.part["run_id"], str(path), folder)

    def close(self, status: str | None) -> None:
        if status is not None:
            self.client.set_terminated(self.part["run_id"], status)


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, part: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.part = part
        self.writer = SummaryWriter(part["log_dir"])

    @classmethod
    def parent_part(cls, conf: dict, name: str, kind: str, group: str) -> dict:
        return {"log_dir": str(Path(conf["log_dir"]) / group)}

    def child_part(self, name: str, kind: str) -> dict:
        return {"log_dir": str(Path(self.part["log_dir"]) / name)}

    def params(self, values: Mapping[str, str]) -> None:
        rows = "\n".join(f"| {k} | {v.replace('|', '/')} |" for k, v in values.items())
        self.writer.add_text("params", "| parameter | value |\n|---|---|\n" + rows)
        self.writer.flush()

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, float(v), int(step))
        self.writer.flush()

    def artifacts(self, path: Path, folder: str) -> None:
        """PNG plots as images, text files (report.md, JSON, YAML, CSV) as text: what TensorBoard shows."""
        import matplotlib.image

        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            tag = f"{folder}/{file.relative_to(path) if path.is_dir() else file.name}"
            if file.suffix == ".png":
                self.writer.add_image(tag, matplotlib.image.imread(file)[..., :3], dataformats="HWC")
            elif file.suffix in (".md", ".txt", ".json", ".yaml", ".csv"):
                self.writer.add_text(tag, file.read_text())
        self.writer.flush()

    def close(self, status: str | None) -> None:
        self.writer.close()


class _Wandb:
    name = "wandb"

    def __init__(self, part: dict):
        import wandb

        self.part = part
        # resume="allow": the first process to attach creates the run, later ones continue it.
        self.run = wandb.init(
            id=part["id"],
            resume="allow",
            name=part["name"],
            group=part["group"],
            job_type=part["job_type"],
            project=part["project"],
            entity=part["entity"],
            mode=part["mode"],
            dir=part["dir"],
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True),
        )
        # Our step is a metric, not W&B's own counter, which only moves forward: a dev metric
        # logged after the steps that follow it would be dropped.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    @classmethod
    def parent_part(cls, conf: dict, name: str, kind: str, group: str) -> dict:
        return {**conf, "id": _wandb_id(), "name": name, "group": group, "job_type": kind}

    def child_part(self, name: str, kind: str) -> dict:
        return {**self.part, "id": _wandb_id(), "name": name, "job_type": kind}

    def params(self, values: Mapping[str, str]) -> None:
        self.run.config.update(dict(values), allow_val_change=True)

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        self.run.log({**{k: float(v) for k, v in values.items()}, "step": int(step)})

    def artifacts(self, path: Path, folder: str) -> None:
        import wandb

        artifact = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "-", f"{self.part['name']}-{folder}"), type=folder)
        (artifact.add_dir if path.is_dir() else artifact.add_file)(str(path))
        self.run.log_artifact(artifact)

    def close(self, status: str | None) -> None:
        self.run.finish(exit_code=1 if status == "FAILED" else 0)


# Trackers that failed in this process, per run tree (a parent's group): the parent and all its
# children leave a failed tracker out together, so a dead server is warned about once, not per child.
_OFF: dict[str | None, set[str]] = {}


def _off_in(group: str | None) -> set[str]:
    return _OFF.setdefault(group, set()) if group is not None else set()


def _warn(tracker: str, run: str, err: Exception) -> None:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(
        f"[track] warning: {tracker} failed ({first[:300]}); {tracker} tracking is off for the rest of {run} "
        "(metrics.jsonl and the report hold every number)",
        flush=True,
    )


def _wandb_id() -> str:
    return uuid.uuid4().hex[:12]


BACKENDS: dict[str, type[_MLflow | _TensorBoard | _Wandb]] = {
    "mlflow": _MLflow,
    "tensorboard": _TensorBoard,
    "wandb": _Wandb,
}


# ---------------------------------------------------------------------------------------------
# A run on every configured tracker


class Run:
    """One run (a pipeline's, or a step's under it) on the trackers its handle names.

    Calls return at once: they run in order on the Run's one thread. A tracker that fails is warned
    about once and left out of every later call and child. With no tracker every call is a no-op.
    """

    def __init__(self, handle: dict):
        self.handle = handle
        self.trackers = [t for t in BACKENDS if t in handle]
        self.backends: dict[str, Any] = {}
        self.off = _off_in(handle.get("group"))
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracking") if self.trackers else None
        for t in self.trackers:
            self._submit(t, partial(self._open, t, handle[t]))

    def _open(self, tracker: str, part: dict) -> None:
        self.backends[tracker] = BACKENDS[tracker](part)

    def _call(self, tracker: str, method: str, *args: Any) -> Any:
        return getattr(self.backends[tracker], method)(*args)

    def _submit(self, tracker: str, call: Callable[[], Any]) -> Future | None:
        if self.pool is None or tracker in self.off:
            return None
        return self.pool.submit(self._guarded, tracker, call)

    def _guarded(self, tracker: str, call: Callable[[], Any]) -> Any:
        if tracker in self.off:
            return None
        try:
            return call()
        except Exception as err:  # any failure of a tracker's library or server: warn once, go on
            self.off.add(tracker)
            _warn(tracker, self.handle.get("name", "this run"), err)
            return None

    def _each(self, method: str, *args) -> None:
        for t in self.trackers:
            self._submit(t, partial(self._call, t, method, *args))

    def params(self, values: Mapping[str, str]) -> None:
        if values:
            self._each("params", dict(values))

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        if values:
            self._each("metrics", dict(values), step)

    def artifacts(self, path: str | Path, folder: str) -> None:
        """A file or a folder (with everything under it), kept under `folder`. One in object storage is
        downloaded to a temporary folder first, removed once every tracker has logged it. The steps log
        files they have written: nothing at path is an error (FileNotFoundError naming it)."""
        if self.pool is None:
            return
        if not storage.exists(path, "output.dir"):
            raise FileNotFoundError(f"tracker artifact ({folder}): nothing at {path}")
        if not is_uri(path):
            self._each("artifacts", Path(path), folder)
            return
        local = tempfile.mkdtemp(prefix="pocl-artifact-")
        self._each("artifacts", storage.download(path, local, "output.dir"), folder)
        self.pool.submit(shutil.rmtree, local, True)  # after those calls: the pool runs them in order

    def child(self, name: str, kind: str) -> dict:
        """A child run's handle (its MLflow run is created now; waits for the calls queued before)."""
        handle = {"name": name, "group": self.handle.get("group"), "kind": kind}
        futures = {t: self._submit(t, partial(self._call, t, "child_part", name, kind)) for t in self.trackers}
        for t, future in futures.items():
            part = future.result() if future is not None else None
            if part is not None:
                handle[t] = part
        return handle

    def close(self, status: str | None = None) -> None:
        """Finish the run with `status` (FINISHED, FAILED), or with None detach from it for a later
        process to go on (an MLflow run stays open); waits at most CLOSE_TIMEOUT_S for queued calls."""
        if self.pool is None:
            return
        last = [f for f in (self._submit(t, partial(self._call, t, "close", status)) for t in self.trackers) if f]
        self.pool.shutdown(wait=False)
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        try:
            for future in last:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            print(
                f"[track] warning: the trackers still had calls queued after {CLOSE_TIMEOUT_S:.0f}s; "
                "left unsent (metrics.jsonl and the report hold every number)",
                flush=True,
            )
        self.pool = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind, error, tb) -> None:
        self.close("FAILED" if kind is not None else "FINISHED")


def attach(handle: dict | None) -> Run:
    """The run a handle names, attached in this process (None: a run that logs nowhere)."""
    return Run(handle or {})


def start(cfg: RunConfig, kind: str = "pipeline") -> Run:
    """The parent run of one pipeline or sweep invocation, named after the config. A tracker that
    cannot create it (server unreachable, bad credentials) is warned about and left out."""
    group = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    handle: dict[str, Any] = {"name": cfg.name, "group": group, "kind": kind}
    for tracker, conf in settings(cfg).items():
        try:
            handle[tracker] = BACKENDS[tracker].parent_part(conf, cfg.name, kind, group)
        except Exception as err:  # as in Run: warn once, run without this tracker
            _off_in(group).add(tracker)
            _warn(tracker, cfg.name, err)
    return attach(handle)


def tune_callbacks(handle: dict) -> list[Callback]:
    """Ray Tune's own logger callbacks for the sweep's trials, one tracker run per trial, grouped
    under the sweep's run: MLflow trial runs are its children, W&B's are in its group. Tune writes
    TensorBoard event files into each trial's folder by itself (its default TBXLoggerCallback)."""
    callbacks: list[Callback] = []
    if "mlflow" in handle:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        m = handle["mlflow"]
        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=m["tracking_uri"],
                experiment_name=m["experiment"],
                tags={"mlflow.parentRunId": m["run_id"], "pocl_ray.kind": "trial"},
            )
        )
    if "wandb" in handle:
        from ray.air.integrations.wandb import WandbLoggerCallback

        w = handle["wandb"]
        callbacks.append(
            WandbLoggerCallback(
                project=w["project"], group=w["group"], entity=w["entity"], mode=w["mode"], dir=w["dir"]
            )
        )
    return callbacks
