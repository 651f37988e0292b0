"""Every phase's batch source, and the streams of the phases that take the next K batches an epoch."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from ..errors import CheckpointError
from ..saved_state import tensors_to
from .sources import BatchSource, SeededLoader, StatefulSource, batch_source
from .stream import PassStream

__all__ = ["PhaseSources"]


class PhaseSources:
    """Every phase's batch source: a part of the run's state (the phases' layout and the data position).

    The saved position of a rebuilt DataLoader is global: the samples of the
    pass's order that all ranks together have consumed. A run resumed on
    another number of processes goes on from that sample, so no sample is
    skipped or seen twice. A loader that keeps its own state saves that. A
    phase that takes the next K batches of a stream each epoch saves its
    stream's pass and its position in it.

    Args:
        names: The phases' names, in order.
        sources: Their batch sources.
        position: The run's position (which phase is open, how many of its batches are done).
        world_size: How many processes share each rebuilt DataLoader.
        streams: Each phase's ``PassStream``, or None for a phase that runs one whole pass an epoch.
    """

    def __init__(self, names: Sequence[str], sources: Sequence[BatchSource], position: Any = None,
                 world_size: int = 1, streams: Sequence[PassStream | None] | None = None) -> None:  # fmt: skip
        self.names, self.sources, self.position, self.world_size = list(names), list(sources), position, world_size
        self.streams = list(streams) if streams is not None else [None] * len(self.sources)

    @classmethod
    def for_phases(cls, phases: Sequence[Any], worker_signals: Iterable[int] = (), position: Any = None,
                   rank: int = 0, world_size: int = 1) -> PhaseSources:  # fmt: skip
        """The batch sources of ``phases`` (``Phase`` objects), in order."""
        sources = [batch_source(phase.loader, index, worker_signals, rank, world_size)
                   for index, phase in enumerate(phases)]  # fmt: skip
        if world_size > 1 and rank == 0:
            for phase, source in zip(phases, sources, strict=True):
                sampler = getattr(getattr(phase.loader, "batch_sampler", None), "sampler", None)
                if not isinstance(source, SeededLoader) and not isinstance(sampler, DistributedSampler):
                    warnings.warn(f"phase {phase.name!r}: its loader is not sharded between the {world_size} "
                                  "processes, so each one goes through all of it; give it a DistributedSampler, or "
                                  "a DataLoader over a map-style dataset, which the trainer shards", stacklevel=4)  # fmt: skip
        streams = [PassStream(source, phase.name) if phase.batches is not None else None
                   for phase, source in zip(phases, sources, strict=True)]  # fmt: skip
        return cls([phase.name for phase in phases], sources, position, world_size, streams)

    def layout(self) -> list[tuple[str, int | None]]:
        """Each phase's name and batches per epoch in this process (None: unknown)."""
        return [(name, source.length) for name, source in zip(self.names, self.sources, strict=True)]

    def global_layout(self) -> list[tuple[str, int | None]]:
        """Each phase's name and batches per epoch in one process: the same whatever the number of processes."""
        return [(name, source.global_length) for name, source in zip(self.names, self.sources, strict=True)]

    def __getitem__(self, position: int) -> BatchSource:
        return self.sources[position]

    def _shards(self, source: BatchSource) -> int:
        """How many processes share ``source``'s passes: the trainer shards only a DataLoader it rebuilds."""
        return self.world_size if isinstance(source, SeededLoader) else 1

    def why_not_resumable(self) -> str | None:
        """Why no point of the run can be resumed any more (a stream that cannot reopen where it stands); None:
        every point between batches can, as far as the streams go."""
        for name, source, stream in zip(self.names, self.sources, self.streams, strict=True):
            if stream is not None and stream.started and not source.resumable:
                return f"phase {name!r} goes on through its loader's stream, which cannot start again there: {source.reason}"
        return None

    def drop_resume_points(self) -> None:
        """Forget where the saved passes of rebuilt DataLoaders were to go on: the run resumed between phases, so
        each phase's next pass starts whole (a stream keeps its own position)."""
        for source in self.sources:
            if isinstance(source, SeededLoader):
                source.drop_resume_point()

    def close_streams(self) -> None:
        """Let go of the streams' open passes, so their DataLoaders' workers shut down."""
        for stream in self.streams:
            if stream is not None:
                stream.close()

    def _samples_done(self, index: int, source: BatchSource) -> int | None:
        position = self.position
        if not isinstance(source, SeededLoader) or position is None or position.phase_index != index:
            return None
        if self.streams[index] is not None:  # a stream saves its own position
            return None
        return source.samples_done(position.batch_index + 1)

    def state_dict(self) -> list[dict[str, Any]]:
        return [{"phase": name, "batches": source.length, "global_batches": source.global_length,
                 "shards": self._shards(source),
                 "samples_done": self._samples_done(index, source), "position": source.state_dict(),
                 "pass": source.pass_state() if isinstance(source, StatefulSource) else None,
                 "stream": None if stream is None else stream.state_dict()}
                for index, (name, source, stream) in enumerate(zip(self.names, self.sources, self.streams,
                                                                   strict=True))]  # fmt: skip

    def check_fits(self, state: list[dict[str, Any]]) -> None:
        saved = [(phase["phase"], phase["global_batches"]) for phase in state]
        ours = self.global_layout()
        if saved != ours:
            raise CheckpointError(f"the checkpoint's phases (name, batches) are {saved}, this trainer's {ours}")
        for phase, source in zip(state, self.sources, strict=True):  # as many: the layouts are equal
            if phase["shards"] == self._shards(source):
                if phase["batches"] != source.length:
                    raise CheckpointError(f"phase {phase['phase']!r} has {phase['batches']} batches in the checkpoint, "
                                          f"{source.length} here")  # fmt: skip
            elif not isinstance(source, SeededLoader) or phase["samples_done"] is not None and (
                    isinstance(phase["samples_done"], bool) or not 0 <= phase["samples_done"] <= source.samples):  # fmt: skip
                raise CheckpointError(f"phase {phase['phase']!r} was saved with its data shared between {phase['shards']}"
                                      f" processes, which this run cannot take over")  # fmt: skip
        if [phase["position"] is None for phase in state] != [not source.keeps_own_state for source in self.sources]:
            raise CheckpointError("the checkpoint's loaders and this trainer's disagree on which keep their own state")
        for phase, stream in zip(state, self.streams, strict=True):
            saved_stream = phase.get("stream")  # None in a checkpoint saved before streams
            if (saved_stream is None) != (stream is None):
                ours, theirs = ("a whole pass", "the next batches of a stream") if stream is None else (
                    "the next batches of a stream", "a whole pass")  # fmt: skip
                raise CheckpointError(f"phase {phase['phase']!r} runs {ours} each epoch here, but {theirs} in the "
                                      "checkpoint; resume with the phase's batches= as it was saved")  # fmt: skip
            if stream is not None:
                try:
                    stream.check_fits(saved_stream)
                except CheckpointError as error:
                    raise CheckpointError(f"phase {phase['phase']!r}: {error}") from error
        for phase, source in zip(state, self.sources, strict=True):
            if "pass" not in phase:  # a checkpoint saved before the pass was
                continue
            if not isinstance(source, StatefulSource):
                if phase["pass"] is not None:
                    raise CheckpointError(f"phase {phase['phase']!r}: the checkpoint holds a pass of a loader "
                                          "that keeps its own state, which this one does not")  # fmt: skip
                continue
            try:
                source.check_pass_state(phase["pass"])
            except CheckpointError as error:
                raise CheckpointError(f"phase {phase['phase']!r}: {error}") from error

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        for index, (source, saved) in enumerate(zip(self.sources, state, strict=True)):
            position = tensors_to(saved["position"], torch.device("cpu"))
            if isinstance(source, StatefulSource):  # applied when it next opens
                pass_state = saved.get("pass") or {"index": self._latest_pass_epoch(index), "generator": None}
                source.load_state_dict(position, tensors_to(pass_state, torch.device("cpu")))
            else:
                source.load_state_dict(position)
            done = saved["samples_done"]
            if isinstance(source, SeededLoader) and saved["shards"] != self.world_size and done:
                # Saved mid-phase: go on from that sample (none left after the pass's last batch); a run
                # resumed between phases drops it (Run.loaded), and the next pass opens whole.
                source.resume_at(done)
        for stream, saved in zip(self.streams, state, strict=True):
            if stream is not None:
                stream.load_state_dict(saved["stream"])

    def _latest_pass_epoch(self, index: int) -> int | None:
        """The epoch of phase ``index``'s latest pass at the run's position (None: before the first).

        For a checkpoint saved before it held each loader's pass: the position is loaded before the data,
        and every phase runs once an epoch, so the phases up to the current one have run in this epoch and
        the others in the one before. (A run saved after an error as a phase started, before it opened its
        loader, is the exception that the saved pass gets right.)
        """
        position = self.position
        if position is None:
            return None
        if index <= position.phase_index:
            return position.epoch
        return position.epoch - 1 if position.epoch > 0 else None
