"""Experiment trackers: a killed and resumed run is one tracker run, each step logged once, as an uninterrupted
run logs it. The protocol's example in docs/trackers.md runs as written; MLflow is read back through its client."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer.callbacks import Checkpoint, SmoothedLoss, TrackerLogger

from .test_goodput import CrashAtStep

DOC = Path(__file__).parents[2] / "docs" / "trackers.md"
SCRIPT = Path(__file__).with_name("small_run.py")


def documented_tracker(workdir: Path) -> dict:
    """The names the protocol's example in docs/trackers.md defines, run as written in ``workdir``."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    [example] = [block for block in blocks if "class JsonLinesTracker" in block]
    assert len(example.splitlines()) <= 45, "the example is meant to be short"
    names: dict = {}
    exec(compile(example.replace('"runs/tracked"', repr(str(workdir / "runs/tracked"))), str(DOC), "exec"), names)
    return names


def build(folder: Path, logger: st.Callback, *callbacks: st.Callback, device, keep_last: int | None = 3) -> st.Trainer:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    inputs, labels = torch.randn(96, 5, generator=generator), torch.randint(0, 2, (96,), generator=generator)
    batches = [(inputs[index : index + 8], labels[index : index + 8]) for index in range(0, 96, 8)]
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))
    return st.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), F.cross_entropy,
                      [st.Phase("train", batches), st.Phase("valid", batches[:3], grad=False)],
                      callbacks=[SmoothedLoss(), logger, Checkpoint(folder, every_steps=5, keep_last=keep_last), *callbacks],
                      epochs=2,
                      device=device, seed=3)  # fmt: skip


def points(path: Path) -> list[tuple[str, int, float]]:
    lines = path.read_text().splitlines()
    assert "params" in json.loads(lines[0])
    return [(point["name"], point["step"], point["value"]) for point in map(json.loads, lines[1:])]


def test_the_documented_tracker_shows_a_crashed_and_resumed_run_as_one_with_each_step_once(tmp_path, device):
    """The docs' JSON-lines tracker: crashed at step 8 (saved at 5) and resumed, the run's file has each point
    once, the points of an uninterrupted run's file, values equal."""
    names = documented_tracker(tmp_path)
    logger = names["logger"]
    with pytest.raises(RuntimeError, match="crash at step 8"):
        build(tmp_path / "run", logger, CrashAtStep(8), device=device).fit()
    resumed = build(tmp_path / "run", TrackerLogger(names["JsonLinesTracker"](tmp_path / "runs/tracked"),
                                                    every_steps=2), device=device)  # fmt: skip
    resumed.load_checkpoint(tmp_path / "run")
    resumed.fit()
    whole = build(tmp_path / "whole", TrackerLogger(names["JsonLinesTracker"](tmp_path / "whole-tracked"),
                                                    every_steps=2), device=device).fit()  # fmt: skip
    [tracked] = (tmp_path / "runs/tracked").glob("*.jsonl")  # one run
    assert tracked.stem == resumed.run_id
    logged, expected = points(tracked), points(next((tmp_path / "whole-tracked").glob("*.jsonl")))
    assert max(Counter((name, step) for name, step, _ in logged).values()) == 1  # each step once
    assert sorted(logged) == sorted(expected)  # and as the uninterrupted run logged them, values equal
    assert {name for name, _, _ in logged} >= {"step/lr", "step/train_loss", "epoch/train_loss", "epoch/valid_loss"}
    assert whole.global_step == resumed.global_step == 24


def test_a_tracker_of_another_shape_is_used_through_the_protocol(tmp_path, device):
    """``TrackerLogger`` calls only the protocol: params once as the run starts, points at the global step."""
    names = documented_tracker(tmp_path)
    logger = TrackerLogger(names["JsonLinesTracker"](tmp_path / "tracked"), every_steps=4)
    trainer = build(tmp_path / "run", logger, device=device).fit()
    [tracked] = (tmp_path / "tracked").glob("*.jsonl")
    params = json.loads(tracked.read_text().splitlines()[0])["params"]
    assert params["seed"] == 3 and params["total_steps"] == 24 and params["parameters"] == 5 * 16 + 16 + 16 * 2 + 2
    steps = sorted({step for name, step, _ in points(tracked) if name == "step/lr"})
    assert steps == list(range(4, 25, 4)) and trainer.global_step == 24


def test_replays_refuse_a_tracker_logger_as_they_refuse_callbacks_that_write_files(tmp_path, device):
    """``travel_to`` and ``bisect`` replay the run: a tracker's run would get the past again (and be reopened)."""
    names = documented_tracker(tmp_path)
    build(tmp_path / "run", TrackerLogger(names["JsonLinesTracker"](tmp_path / "tracked")), device=device).fit()
    replay = build(tmp_path / "replay", TrackerLogger(names["JsonLinesTracker"](tmp_path / "tracked")), device=device)
    with pytest.raises(ValueError, match="would write into its folders or trackers: TrackerLogger"):
        replay.travel_to(tmp_path / "run", step=7)


def test_every_steps_is_checked():
    with pytest.raises(ValueError, match="every_steps"):
        TrackerLogger(object(), every_steps=0)  # type: ignore[arg-type]


def test_an_upload_setting_that_cannot_work_is_refused(tmp_path):
    pytest.importorskip("mlflow")
    from statetrainer.callbacks import MLflowLogger

    with pytest.raises(ValueError, match="upload='all' needs checkpoints="):
        MLflowLogger(f"sqlite:///{tmp_path / 'mlflow.db'}", upload="all")
    with pytest.raises(ValueError, match="upload is 'every'; use 'last' or 'all'"):
        MLflowLogger(f"sqlite:///{tmp_path / 'mlflow.db'}", checkpoints=tmp_path, upload="every")


def _mlflow_points(uri: str) -> tuple[list, dict[str, list[tuple[int, float]]]]:
    """Every run of the small run's experiment in ``uri``, and the first one's metric histories."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("small-run")
    runs = client.search_runs([experiment.experiment_id])
    histories = {name: [(point.step, point.value) for point in client.get_metric_history(runs[0].info.run_id, name)]
                 for name in runs[0].data.metrics}  # fmt: skip
    return runs, histories


def _mlflow_checkpoints(uri: str, experiment: str, into: Path) -> dict[str, bytes]:
    """The files in the one run of ``experiment``'s ``checkpoints`` artifacts, downloaded into ``into``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    if not client.list_artifacts(run.info.run_id, "checkpoints"):
        return {}
    folder = Path(client.download_artifacts(run.info.run_id, "checkpoints", str(into)))
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.mark.parametrize("upload", ["last", "all"])
def test_mlflow_uploads_checkpoints_as_artifacts_once_across_a_crash_and_resume(tmp_path, device, upload):
    """``checkpoints=folder``: at the end, the newest checkpoint (the bytes on disk); with ``upload="all"``, each
    one as the run goes, a crashed and resumed run included (12 steps an epoch, saves every 5 steps and each epoch,
    all kept). A crash uploads nothing at the end: the run did not finish."""
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from statetrainer.callbacks import MLflowLogger

    uri, folder = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "run"

    def logger() -> MLflowLogger:
        return MLflowLogger(uri, experiment="artifacts", every_steps=5, checkpoints=folder,
                            upload=upload, artifact_location=str(tmp_path / "artifacts"))  # fmt: skip

    with pytest.raises(RuntimeError, match="crash at step 17"):
        build(folder, logger(), CrashAtStep(17), device=device, keep_last=None).fit()
    uploaded = _mlflow_checkpoints(uri, "artifacts", tmp_path / "after-crash")
    saved = {path.name: path.read_bytes() for path in sorted(folder.glob("ckpt-*.safetensors"))}
    assert len(saved) == 4  # steps 5, 10, the first epoch's end (12), 15
    assert uploaded == ({name: saved[name] for name in list(saved)[:3]} if upload == "all" else {})
    resumed = build(folder, logger(), device=device, keep_last=None)
    resumed.load_checkpoint(folder)
    resumed.fit()
    uploaded = _mlflow_checkpoints(uri, "artifacts", tmp_path / "after-end")
    saved = {path.name: path.read_bytes() for path in sorted(folder.glob("ckpt-*.safetensors"))}
    assert len(saved) == 6  # and 20, the second epoch's end (24)
    assert uploaded == (saved if upload == "all" else {name: saved[name] for name in list(saved)[-1:]})


def test_an_upload_that_finds_its_checkpoint_gone_or_the_store_down_does_not_stop_the_run(tmp_path, device):
    """The first upload finds its file pruned meanwhile (skipped, tried no more), the second finds the store down
    (a warning; tried again at the next phase): the run goes on and ends FINISHED with the others uploaded."""
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from statetrainer.callbacks import MLflowLogger

    uri, folder = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "run"
    logger = MLflowLogger(uri, experiment="flaky", every_steps=5, checkpoints=folder, upload="all",
                          artifact_location=str(tmp_path / "artifacts"))  # fmt: skip
    upload, calls = logger.tracker.log_checkpoint, []

    def pruned_then_down(path: Path) -> None:
        calls.append(path.name)
        if len(calls) == 1:
            path.rename(tmp_path / path.name)  # as a prune by a background write would, mid-upload
        if len(calls) == 2:
            raise ConnectionError("the store is down")
        upload(path)

    logger.tracker.log_checkpoint = pruned_then_down  # type: ignore[method-assign]
    with pytest.warns(UserWarning, match="uploading checkpoints to MLflow failed.*the store is down"):
        trainer = build(folder, logger, device=device, keep_last=None).fit()
    assert trainer.finished
    from mlflow.tracking import MlflowClient

    [run] = MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("flaky").experiment_id]
    )
    assert run.info.status == "FINISHED"
    uploaded = _mlflow_checkpoints(uri, "flaky", tmp_path / "down")
    on_disk = {path.name: path.read_bytes() for path in folder.glob("ckpt-*.safetensors")}
    assert calls[0] not in uploaded and calls[0] not in on_disk and calls[1] == calls[2]  # the failed one again
    assert uploaded == on_disk


@pytest.mark.slow
def test_mlflow_shows_a_run_sigkilled_at_three_points_as_one_run_with_each_step_once(tmp_path, device):
    """``small_run.py --mlflow`` SIGKILLed after steps 7 (before any checkpoint), 23 and 47, then run to its end:
    the SQLite store holds one MLflow run, FINISHED, whose every metric has each step once, with the values of an
    uninterrupted run's history, and the run's parameters."""
    pytest.importorskip("mlflow")
    uri, whole_uri = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'whole.db'}"
    base = [sys.executable, str(SCRIPT), "--device", str(device)]
    for kill in (7, 23, 47, None):
        extra = [] if kill is None else ["--kill-at-step", str(kill)]
        done = subprocess.run([*base, str(tmp_path / "run"), "--mlflow", uri, *extra], capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == (0 if kill is None else -9), done.stderr[-3000:]
    done = subprocess.run([*base, str(tmp_path / "whole"), "--mlflow", whole_uri], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    runs, histories = _mlflow_points(uri)
    [whole_run], expected = _mlflow_points(whole_uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert histories.keys() == expected.keys()
    assert {"step/lr", "step/train_loss", "epoch/valid_loss"} <= histories.keys()
    for name, history in histories.items():
        steps = [step for step, _ in history]
        assert len(steps) == len(set(steps)), name  # each step once
        assert sorted(history) == sorted(expected[name]), name  # the uninterrupted run's points, values equal
    assert runs[0].data.params["seed"] == "3" and int(runs[0].data.params["parameters"]) > 0


def _wandb_points(folder: Path) -> list[tuple[str, int, float]]:
    """Every point of every offline W&B run file under ``folder``, in the order written."""
    from statetrainer.callbacks.trackers import read_wandb_history

    files = sorted((folder / "wandb").glob("offline-run-*/run-*.wandb"))
    return [(name, step, value) for path in files for step, values in read_wandb_history(path)
            for name, value in values.items()]  # fmt: skip


@pytest.mark.slow
def test_wandb_offline_shows_a_run_sigkilled_at_three_points_as_one_run_with_each_step_once(tmp_path, device):
    """``small_run.py --wandb`` (offline) SIGKILLed after steps 7, 23 and 47, then run to its end: its offline run
    files, read back, are of one run id and hold each step of each metric once, the uninterrupted run's points."""
    pytest.importorskip("wandb")
    base = [sys.executable, str(SCRIPT), "--device", str(device)]
    environment = {**__import__("os").environ, "WANDB_SILENT": "true"}
    for kill in (7, 23, 47, None):
        extra = [] if kill is None else ["--kill-at-step", str(kill)]
        done = subprocess.run([*base, str(tmp_path / "run"), "--wandb", str(tmp_path / "tracked"), *extra],
                              capture_output=True, text=True, timeout=300, env=environment)  # fmt: skip
        assert done.returncode == (0 if kill is None else -9), done.stderr[-3000:]
    done = subprocess.run([*base, str(tmp_path / "whole"), "--wandb", str(tmp_path / "whole-tracked")],
                          capture_output=True, text=True, timeout=300, env=environment)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {path.name.rsplit("-", 1)[1] for path in (tmp_path / "tracked" / "wandb").glob("offline-run-*")}
    assert len(runs) == 1 and len(list((tmp_path / "tracked" / "wandb").glob("offline-run-*"))) == 4
    logged, expected = _wandb_points(tmp_path / "tracked"), _wandb_points(tmp_path / "whole-tracked")
    assert max(Counter((name, step) for name, step, _ in logged).values()) == 1  # each step once
    assert sorted(logged) == sorted(expected)
    assert {"step/lr", "step/train_loss", "epoch/valid_loss"} <= {name for name, _, _ in logged}


class ForgetfulTracker:
    """Keeps its points in memory and stores them only when its run finishes: what W&B offline does, so a run
    that does not finish loses them all."""

    def __init__(self, store: dict) -> None:
        self.store, self.buffer = store, []

    def start(self, run_key, params):
        self.store.setdefault(run_key, [])
        return run_key

    def logged(self):
        newest: dict[str, int] = {}
        for _, points in self.store.items():
            for name, step, _ in points:
                newest[name] = max(newest.get(name, -1), step)
        return newest

    def log(self, metrics, step):
        self.buffer += [(name, step, value) for name, value in metrics.items()]

    def close(self, finished):
        if finished:
            next(iter(self.store.values())).extend(self.buffer)
        self.buffer = []


def test_points_a_tracker_lost_when_a_run_crashed_are_logged_again_from_the_checkpoint(tmp_path, device):
    """A tracker that loses what an unfinished run logged: crashed at step 8 (saved at 5), the resumed run logs
    again, from its checkpoint, the points up to step 5 the tracker lost, and the tracker ends with every point
    of an uninterrupted run, once."""
    store: dict = {}
    with pytest.raises(RuntimeError, match="crash at step 8"):
        build(tmp_path / "run", TrackerLogger(ForgetfulTracker(store), every_steps=2), CrashAtStep(8),
              device=device).fit()  # fmt: skip
    assert store and not next(iter(store.values()))  # lost, all of it
    resumed = build(tmp_path / "run", TrackerLogger(ForgetfulTracker(store), every_steps=2), device=device)
    resumed.load_checkpoint(tmp_path / "run")
    resumed.fit()
    whole: dict = {}
    build(tmp_path / "whole", TrackerLogger(ForgetfulTracker(whole), every_steps=2), device=device).fit()
    [logged], [expected] = store.values(), whole.values()
    assert max(Counter((name, step) for name, step, _ in logged).values()) == 1
    assert sorted(logged) == sorted(expected) and min(step for _, step, _ in logged) == 2
