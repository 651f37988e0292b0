"""Experiment trackers (MLflow, Weights & Biases, your own) that show a killed and resumed run as one run.

A tracker integration is a ``Tracker``: it opens (or opens again) the
tracker's run, says up to which step each metric is already there, logs, and
closes. ``TrackerLogger`` drives any ``Tracker`` from the run's hooks, and
does what makes a resume clean:

- the tracker's run is keyed by the statetrainer run's id, which a resumed
  run (and one started again before its first checkpoint) keeps, so it
  continues the same tracker run rather than opening a second;
- a restart recomputes, bit for bit, the steps between its checkpoint and the
  kill, and the killed process had logged them already: a metric is logged
  only past the newest step the tracker holds for it, so each step is there
  once, with the value an uninterrupted run logs;
- a tracker may lose what a killed process logged (W&B offline writes nothing
  before its run finishes): the checkpoint carries the points the tracker had
  not confirmed at the save, and the restart logs again those it lacks.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch

from ..checkpoint.folder import CheckpointFolder
from ..checkpoint.record_log import read_records
from ..checkpoint.sharded import shard_files
from ..errors import CheckpointError
from ..optional import require
from ..saved_state import unwrap_model
from ..summary import summary
from .base import Callback, TrainerView
from .loggers import learning_rates
from .metrics import running_metrics
from .periodic import check_every, due

__all__ = [
    "MLflowLogger",
    "MLflowTracker",
    "Tracker",
    "TrackerLogger",
    "WandbLogger",
    "WandbTracker",
    "read_wandb_history",
    "run_params",
]


class Tracker(Protocol):
    """What an experiment tracker's integration implements (see ``TrackerLogger``).

    An integration whose points are stored once ``log`` returns (MLflow's), or once an optional ``flush()`` returns
    (TensorBoard's; the logger calls it before each save), may set ``durable = True``: nothing it logged is then
    kept in the checkpoint to log again. One that can drop points may have ``rewind(step)``: called before
    ``start`` when the run resumes from a checkpoint at ``step``, to drop what was logged after it (TensorBoard's
    does), so that a resume that is not bit for bit shows its own points there."""

    def start(self, run_key: str, params: dict[str, Any]) -> str:
        """Open the tracker's run for the statetrainer run ``run_key``: the one made for it before (a resumed run),
        or a new one with ``params``; return the tracker's own id of it."""
        ...

    def logged(self) -> dict[str, int]:
        """The newest step the open run holds for each metric name (empty for a new run)."""
        ...

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` at ``step`` (the run's optimizer steps taken)."""
        ...

    def close(self, finished: bool) -> None:
        """Let the run go: ``finished`` when the training run ended, False when an error or a signal stopped it
        (it may be resumed)."""
        ...


def run_params(trainer: TrainerView) -> dict[str, Any]:
    """What a tracker records of a run: its seed, shape and settings, and its model's size."""
    found = summary(trainer.model)
    params = {name: getattr(trainer, name, None)
              for name in ("seed", "epochs", "max_steps", "total_steps", "accumulate", "world_size")}  # fmt: skip
    params.update(phases=", ".join(phase.name + ("" if phase.grad else " (no gradients)") for phase in trainer.phases),
                  optimizer=type(trainer.optimizer).__name__ if trainer.optimizer is not None else None,
                  model=type(unwrap_model(trainer.model)).__name__, parameters=found.parameters,
                  trainable_parameters=found.trainable, parameter_bytes=found.parameter_bytes)  # fmt: skip
    return {name: value for name, value in params.items() if value is not None}


class TrackerLogger(Callback):
    """Logs the run to an experiment tracker (a ``Tracker``), as one run across kills and resumes.

    Every ``every_steps`` optimizer steps, as the batch that took the step ends: the learning rate(s) and the
    training phase's running metrics as ``step/<name>`` (reading them waits for the device: list the logger after
    the metrics); at each epoch's end, every ``trainer.metrics`` entry as ``epoch/<name>``. The step is always
    ``trainer.global_step``. As the run starts, ``run_params`` are recorded. Under torchrun it runs on rank 0.

    Args:
        tracker: The tracker's integration.
        every_steps: Steps between per-step points.
        name: The callback's unique name (defaults to the class name).
    """

    rank_zero_only = True
    runs_in_evaluation = False  # validate() logs nothing, and must not close and reopen the tracker's run

    def __init__(self, tracker: Tracker, every_steps: int = 10, name: str | None = None) -> None:
        check_every(f"{type(self).__name__}: every_steps", every_steps)
        self.tracker, self.every_steps, self.name = tracker, every_steps, name
        self.run_id: str | None = None  # the tracker's id of the run, once open
        self._logged: dict[str, int] = {}
        self._unconfirmed: dict[str, list[tuple[int, float]]] = {}  # logged, and not known to be in the tracker
        self._durable = bool(getattr(tracker, "durable", False))
        self._stepped = False
        self._step = 0  # the newest optimizer step seen
        # The step to rewind the tracker to as it opens: 0 for a run that loaded no checkpoint (a process of it
        # killed before its first checkpoint logged what this one logs again), the loaded checkpoint's, or None
        # (a checkpoint from before the step was saved: log past what the tracker holds).
        self._rewind_to: int | None = 0

    def _open(self, trainer: TrainerView) -> None:
        if self.run_id is not None:
            return
        rewind = getattr(self.tracker, "rewind", None)
        if self._rewind_to is not None and rewind is not None:
            rewind(self._rewind_to)
        self.run_id = self.tracker.start(trainer.run_id, run_params(trainer))
        self._logged = dict(self.tracker.logged())
        missing: dict[int, dict[str, float]] = {}  # what the checkpoint carries and the tracker lost, by step
        for name, points in self._unconfirmed.items():
            for step, value in points:
                if step > self._logged.get(name, -1):
                    missing.setdefault(step, {})[name] = value
        for step in sorted(missing):
            self._send(missing[step], step, keep=False)  # kept already

    def _send(self, metrics: dict[str, float], step: int, keep: bool = True) -> None:
        self.tracker.log(metrics, step)
        self._logged.update(dict.fromkeys(metrics, step))
        if keep and not self._durable:
            for name, value in metrics.items():
                self._unconfirmed.setdefault(name, []).append((step, value))

    def _log(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        self._open(trainer)
        step = trainer.global_step
        new = {name: value for name, value in metrics.items() if step > self._logged.get(name, -1)}
        if new:
            self._send(new, step)

    def on_exit_idle(self, trainer: TrainerView) -> None:
        self._open(trainer)

    def output_files(self) -> list[Path]:
        """The tracker's files, if it writes some (``output_files()``: TensorBoard's event files)."""
        files = getattr(self.tracker, "output_files", None)
        return list(files()) if files is not None else []

    def writes_records(self) -> bool:
        return True  # the tracker's run, files or not

    def open_files(self, trainer: TrainerView) -> None:
        if not trainer.finished:  # a logger with files of its own: as the run (or its resume) begins
            self._open(trainer)

    def on_exit_step(self, trainer: TrainerView) -> None:
        self._step = trainer.global_step
        self._stepped = due(self._step, self.every_steps)

    def on_exit_batch(self, trainer: TrainerView) -> None:
        if self._stepped:  # once the batch's metrics are updated
            self._stepped = False
            values = {**learning_rates(trainer), **running_metrics(trainer)}
            self._log(trainer, {f"step/{name}": value for name, value in values.items()})

    def on_exit_epoch(self, trainer: TrainerView) -> None:
        self._log(trainer, {f"epoch/{name}": float(value) for name, value in trainer.metrics.items()})

    def on_close(self, trainer: TrainerView) -> None:
        if self.run_id is not None:
            self.tracker.close(finished=trainer.finished)
            self.run_id = None

    def state_dict(self) -> dict[str, Any]:
        """The points logged that the tracker has not confirmed holding (all of them, for W&B offline)."""
        flush = getattr(self.tracker, "flush", None)
        if self.run_id is not None and self._durable and flush is not None:
            flush()  # what was logged is where a restart looks before the checkpoint counts it
        if self.run_id is not None and self._unconfirmed:
            try:
                held = self.tracker.logged()
            except Exception as error:  # noqa: BLE001 -- a tracker out of reach must not stop the save
                warnings.warn(f"{self.key}: could not ask the tracker what it holds ({error!r}); the checkpoint "
                              "keeps every point not confirmed", stacklevel=2)  # fmt: skip
                held = {}
            self._unconfirmed = {name: kept for name, points in self._unconfirmed.items()
                                 if (kept := [point for point in points if point[0] > held.get(name, -1)])}  # fmt: skip
        return {"unconfirmed": {name: torch.tensor(points, dtype=torch.float64)
                                for name, points in self._unconfirmed.items()}, "step": self._step}  # fmt: skip

    def check_fits(self, state: dict[str, Any]) -> None:
        step = state.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(f"step is {step!r}, not a step number")
        if "unconfirmed" not in state:
            raise CheckpointError("no unconfirmed points: not a TrackerLogger's state")
        points = state["unconfirmed"]
        if not isinstance(points, dict) or not all(
            isinstance(name, str) and isinstance(value, torch.Tensor) and value.dtype == torch.float64
            and value.dim() == 2 and value.shape[1] == 2 for name, value in points.items()
        ):  # fmt: skip
            raise CheckpointError("unconfirmed is not a {metric: (step, value) rows} dict of float64 tensors")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.run_id is not None:  # loaded into a run under way: the tracker is asked again what it holds
            self.tracker.close(finished=False)
            self.run_id = None
        self._unconfirmed = {name: [(int(step), value) for step, value in points.cpu().tolist()]
                             for name, points in state["unconfirmed"].items()}  # fmt: skip
        self._rewind_to = state.get("step")
        self._step = self._rewind_to or 0


class MLflowTracker:
    """MLflow's integration (the ``mlflow`` extra): a run of ``experiment`` at ``tracking_uri`` (MLflow's default:
    ``MLFLOW_TRACKING_URI``), tagged ``statetrainer.run`` with the statetrainer run's id, by which a resumed run
    finds it again. Parameters are logged once, when the run is made. ``artifact_location`` is where a new
    experiment keeps its artifacts (MLflow's default: ``./mlruns`` for a local store)."""

    TAG = "statetrainer.run"
    ARTIFACTS = "checkpoints"  # the run's artifact folder that checkpoints go in
    durable = True  # log_batch returns once the store holds the points

    def __init__(self, tracking_uri: str | None = None, experiment: str = "statetrainer",
                 run_name: str | None = None, artifact_location: str | None = None) -> None:  # fmt: skip
        tracking = require("mlflow.tracking", "mlflow", "MLflowLogger")
        self.client = tracking.MlflowClient(tracking_uri=tracking_uri)
        self.experiment, self.run_name, self.artifact_location = experiment, run_name, artifact_location
        self.run_id: str | None = None

    def start(self, run_key: str, params: dict[str, Any]) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment)
        experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(
            self.experiment, artifact_location=self.artifact_location)  # fmt: skip
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{self.TAG}` = '{run_key}'",
                                        max_results=1)  # fmt: skip
        if found:
            run_id: str = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(experiment_id, tags={self.TAG: run_key}, run_name=self.run_name).info.run_id
            entities = require("mlflow.entities", "mlflow", "MLflowLogger")
            self.client.log_batch(run_id, params=[entities.Param(key, str(value)) for key, value in params.items()])
        self.run_id = run_id
        return run_id

    def logged(self) -> dict[str, int]:
        assert self.run_id is not None
        names = self.client.get_run(self.run_id).data.metrics
        return {name: max(point.step for point in self.client.get_metric_history(self.run_id, name))
                for name in names}  # fmt: skip

    def log(self, metrics: dict[str, float], step: int) -> None:
        assert self.run_id is not None
        entities = require("mlflow.entities", "mlflow", "MLflowLogger")
        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[entities.Metric(name, value, stamp, step)
                                                    for name, value in metrics.items()])  # fmt: skip

    def close(self, finished: bool) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")
            self.run_id = None

    def checkpoint_sizes(self) -> dict[str, int | None]:
        """The size of each file in the run's ``checkpoints`` artifacts, by name (None: the store does not say)."""
        assert self.run_id is not None
        return {Path(found.path).name: found.file_size for found in self.client.list_artifacts(self.run_id,
                                                                                                 self.ARTIFACTS)}  # fmt: skip

    def log_checkpoint(self, path: Path) -> None:
        """Upload the checkpoint ``path``, with its sharded pieces' files, to the run's ``checkpoints`` artifacts."""
        assert self.run_id is not None
        for file in (*shard_files(path), path):  # the checkpoint last, as on disk
            self.client.log_artifact(self.run_id, str(file), self.ARTIFACTS)


class MLflowLogger(TrackerLogger):
    """``TrackerLogger`` with ``MLflowTracker``: per-step and per-epoch metrics against the global step, the run's
    parameters, one MLflow run across kills and resumes (the ``mlflow`` extra).

    With ``checkpoints`` (a ``Checkpoint`` callback's folder), checkpoints are uploaded to the run's
    ``checkpoints`` artifacts: when the run finishes, the newest one and ``best.safetensors`` if the folder has
    one; with ``upload="all"`` also, as each phase starts, every checkpoint written since the last upload
    (an upload waits for the store: large checkpoints on a remote store take the run's time). A name the run's
    artifacts hold already is not uploaded again (``best.safetensors`` always is), so a resumed run uploads only
    what is new.

    Args:
        tracking_uri: Where MLflow keeps its runs (``sqlite:///mlflow.db``, a server's URL); None: MLflow's default.
        experiment: The MLflow experiment.
        run_name: The MLflow run's name (MLflow picks one if None).
        every_steps: Steps between per-step points.
        name: The callback's unique name (defaults to the class name).
        checkpoints: The folder whose checkpoints to upload; None: none.
        upload: ``"last"``: the newest checkpoint when the run finishes; ``"all"``: each one as the run goes.
        artifact_location: Where a new experiment keeps its artifacts (MLflow's default if None).
    """

    tracker: MLflowTracker

    def __init__(self, tracking_uri: str | None = None, experiment: str = "statetrainer", run_name: str | None = None,
                 every_steps: int = 10, name: str | None = None, *, checkpoints: str | os.PathLike[str] | None = None,
                 upload: str = "last", artifact_location: str | None = None) -> None:  # fmt: skip
        if upload not in ("last", "all"):
            raise ValueError(f"MLflowLogger: upload is {upload!r}; use 'last' or 'all'")
        if upload == "all" and checkpoints is None:
            raise ValueError("MLflowLogger: upload='all' needs checkpoints=<the Checkpoint's folder>")
        super().__init__(MLflowTracker(tracking_uri, experiment, run_name, artifact_location), every_steps, name)
        self.checkpoints = CheckpointFolder(checkpoints) if checkpoints is not None else None
        self.upload = upload
        self._uploaded: dict[str, int | None] | None = None  # the checkpoints the run's artifacts hold, by name

    def _upload(self, trainer: TrainerView, newest_only: bool) -> None:
        assert self.checkpoints is not None
        try:
            self._open(trainer)
            if self._uploaded is None:
                self._uploaded = self.tracker.checkpoint_sizes()
            found = self.checkpoints.checkpoints()
            chosen = found[-1:] if newest_only else found
            if trainer.finished and self.checkpoints.best.is_file():
                chosen.append(self.checkpoints.best)  # always: it is another file under the same name each time
            for path in chosen:
                try:
                    size = path.stat().st_size
                    stored = self._uploaded.get(path.name, -1)
                    if path != self.checkpoints.best and stored in (size, None):
                        continue  # in the store already (a copy a kill cut short has another size; None: not said)
                    self.tracker.log_checkpoint(path)
                except FileNotFoundError:
                    continue  # pruned (by a background write that ended meanwhile) before it could be uploaded
                self._uploaded[path.name] = size
        except Exception as error:  # noqa: BLE001 -- a store out of reach must not stop the training
            warnings.warn(f"{self.key}: uploading checkpoints to MLflow failed ({error!r}); the next upload tries "
                          "again", stacklevel=2)  # fmt: skip

    def on_enter_phase(self, trainer: TrainerView) -> None:
        if self.upload == "all":  # the saves asked for before are made (or in flight, then uploaded later)
            self._upload(trainer, newest_only=False)

    def on_close(self, trainer: TrainerView) -> None:
        try:
            if self.checkpoints is not None and trainer.finished:  # its last (background) write is done
                self._upload(trainer, newest_only=self.upload == "last")
        finally:
            super().on_close(trainer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._uploaded = None


class WandbTracker:
    """Weights & Biases' integration (the ``wandb`` extra): the run ``project``/``run_key`` (W&B runs take the
    statetrainer run's id as theirs, and a resumed one is opened again with ``resume="allow"``).

    Offline (``mode="offline"``), each process writes its own ``offline-run-*-<id>`` folder under ``dir``'s
    ``wandb/``, and ``wandb sync`` uploads them as one run; what the earlier processes logged is read from their
    ``.wandb`` files, so a restart logs each step once. Online, W&B itself refuses a step below the one it holds.
    """

    def __init__(self, project: str = "statetrainer", *, mode: str | None = None, dir: str | None = None,
                 entity: str | None = None, run_name: str | None = None) -> None:  # fmt: skip
        self.wandb = require("wandb", "wandb", "WandbLogger")
        self.project, self.mode, self.dir, self.entity, self.run_name = project, mode, dir, entity, run_name
        self.run: Any = None
        self._earlier: dict[str, int] = {}

    def start(self, run_key: str, params: dict[str, Any]) -> str:
        self.run = self.wandb.init(project=self.project, entity=self.entity, name=self.run_name, id=run_key,
                                   resume="allow", config=params, mode=self.mode, dir=self.dir,
                                   settings=self.wandb.Settings(silent=True))  # fmt: skip
        self._earlier = {}
        if self.run.offline:  # however it was asked for (mode=, WANDB_MODE, wandb offline): the earlier folders
            own = Path(self.run.dir).parent
            for path in sorted(own.parent.glob(f"offline-run-*-{run_key}/run-{run_key}.wandb")):
                if path.parent == own:
                    continue
                try:
                    history = read_wandb_history(path)
                except Exception as error:  # noqa: BLE001 -- a damaged earlier file must not stop the run
                    warnings.warn(f"WandbTracker: {path} does not read ({error!r}); what it holds may be logged "
                                  "again", stacklevel=2)  # fmt: skip
                    continue
                for step, values in history:
                    self._earlier.update({name: max(step, self._earlier.get(name, -1)) for name in values})
        return str(self.run.id)

    def logged(self) -> dict[str, int]:
        return dict(self._earlier)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, finished: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if finished else 1)
            self.run = None


def read_wandb_history(path: Path) -> list[tuple[int, dict[str, float]]]:
    """The points of a W&B run's ``.wandb`` file: each history row's step and its values by name (W&B's own
    ``_step``, ``_runtime``... left out), up to the first record a killed writer left unfinished.

    Raises:
        CheckpointError: Not a W&B run file.
    """
    records = require("wandb.proto.wandb_internal_pb2", "wandb", "WandbLogger")
    rows = []
    for data in read_records(path, b":W&B", 0xBEE1):
        record = records.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") != "history":
            continue
        values = {}
        for item in record.history.item:
            name = ".".join(item.nested_key) if item.nested_key else item.key
            if not name.startswith("_"):
                values[name] = json.loads(item.value_json)
        rows.append((int(record.history.step.num), values))
    return rows


class WandbLogger(TrackerLogger):
    """``TrackerLogger`` with ``WandbTracker``: one W&B run across kills and resumes (the ``wandb`` extra).

    Args:
        project: The W&B project.
        mode: ``"online"``, ``"offline"`` or ``"disabled"``; None: W&B's default (``WANDB_MODE``).
        dir: The folder W&B writes its ``wandb/`` files in (None: the working folder).
        entity: The W&B entity (team or user).
        run_name: The run's display name.
        every_steps: Steps between per-step points.
        name: The callback's unique name (defaults to the class name).
    """

    def __init__(self, project: str = "statetrainer", *, mode: str | None = None, dir: str | None = None,
                 entity: str | None = None, run_name: str | None = None, every_steps: int = 10,
                 name: str | None = None) -> None:  # fmt: skip
        super().__init__(WandbTracker(project, mode=mode, dir=dir, entity=entity, run_name=run_name), every_steps,
                         name)  # fmt: skip
