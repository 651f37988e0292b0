"""Per-batch overhead of statetrainer against a hand-written loop (and Ignite, if installed).

A tiny MLP (32-64-1), batch 64, one thread: the model's own work is a few tens
of microseconds, so what a trainer adds on top shows. ``run_until`` is statetrainer stepped to the
end by ``trainer.run_until("idle")`` rather than ``fit()``; ``batches=K`` trains on the same batches
as 4 epochs each taking the next quarter of the loader's stream (``Phase(..., batches=K)``). Each loop is timed on
pre-built batches (the loop alone) and on a shuffled in-process DataLoader over
a ``TensorDataset`` of the same data (the loop and the data path: statetrainer
rebuilds that loader into its resumable, seeded one). The loops run
interleaved in one process, each round timing every loop once, and the median
round is reported.

    uv run python benchmarks/overhead.py                      # hand loop vs statetrainer
    uv run --group bench python benchmarks/overhead.py        # + PyTorch Ignite's Engine
    python benchmarks/overhead.py --device cuda               # on a GPU (batches pre-built there)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable

import torch
from timing import report
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import statetrainer as st

DEVICE = torch.device("cpu")  # set from --device


def make_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)).to(DEVICE)
    return model, torch.optim.SGD(model.parameters(), lr=1e-3)


# Each factory builds a fresh model and loop outside the timing and returns the call to time.
Factory = Callable[[Iterable[tuple[torch.Tensor, torch.Tensor]]], Callable[[], None]]


def hand_loop(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    model, optimizer = make_model()
    loss_fn = nn.MSELoss()

    def run() -> None:
        model.train()
        for inputs, target in batches:
            inputs, target = inputs.to(DEVICE, non_blocking=True), target.to(DEVICE, non_blocking=True)
            loss = loss_fn(model(inputs), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def statetrainer_loop(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    model, optimizer = make_model()
    trainer = st.Trainer(model, optimizer, nn.MSELoss(), [st.Phase("train", batches)], device=DEVICE)
    return trainer.fit


def ledger_loop(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    """statetrainer with a ``GoodputLedger`` (opt-in): its marks around the hooks, in a folder of its own."""
    model, optimizer = make_model()
    ledger = st.callbacks.GoodputLedger(tempfile.mkdtemp(prefix="ledger-"))
    trainer = st.Trainer(model, optimizer, nn.MSELoss(), [st.Phase("train", batches)], callbacks=[ledger],
                         device=DEVICE)  # fmt: skip
    return trainer.fit


def ema_loop(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    """statetrainer with an ``EMA(0.999)`` of the weights: one fused update after every step."""
    model, optimizer = make_model()
    trainer = st.Trainer(model, optimizer, nn.MSELoss(), [st.Phase("train", batches)],
                         callbacks=[st.callbacks.EMA(0.999)], device=DEVICE)  # fmt: skip
    return trainer.fit


def run_until_loop(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    """statetrainer stepped to the run's end by ``run_until``: its stop check runs after every transition."""
    model, optimizer = make_model()
    trainer = st.Trainer(model, optimizer, nn.MSELoss(), [st.Phase("train", batches)], device=DEVICE)
    return lambda: trainer.run_until("idle")


def stream_loop(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    """statetrainer over the same batches as 4 epochs of ``Phase(..., batches=K)``: the stream's per-batch cost."""
    model, optimizer = make_model()
    per_epoch = len(batches) // 4  # type: ignore[arg-type]  # the lists and DataLoaders here have a length
    phases = [st.Phase("train", batches, batches=per_epoch)]
    trainer = st.Trainer(model, optimizer, nn.MSELoss(), phases, epochs=4, device=DEVICE)
    return trainer.fit


def ignite_loop(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    from ignite.engine import create_supervised_trainer

    model, optimizer = make_model()
    engine = create_supervised_trainer(model, optimizer, nn.MSELoss(), device=DEVICE)
    return lambda: engine.run(batches, max_epochs=1)


def machine_only(batches: int, ledger: bool = False) -> float:
    """us for one batch's four transitions of a bare machine (no callbacks, no work); with ``ledger``, with the
    marks a ``GoodputLedger`` places around them, writing into its file."""
    from types import SimpleNamespace

    from statetrainer.callbacks.base import surround_hooks
    from statetrainer.machine import STATES, TrainingMachine
    from statetrainer.timing import CheckpointTime

    enter: dict[str, list] = {state: [] for state in STATES}
    exit: dict[str, list] = {state: [] for state in STATES}
    target = SimpleNamespace(
        checkpoint_time=CheckpointTime(),
        device=DEVICE,
        phase=SimpleNamespace(grad=True),
        run_id="benchmark",
        state="idle",
    )
    if ledger:
        timer = st.callbacks.GoodputLedger(tempfile.mkdtemp(prefix="ledger-"))
        surround_hooks(enter, exit, [timer])
        timer.open_files(target)  # type: ignore[arg-type]  # what the ledger reads of a trainer
    machine = TrainingMachine(target=target, enter=enter, exit=exit)
    machine.fire("start_epoch")
    machine.fire("start_phase")
    start_batch, backward, step, end_batch = map(machine.firer, ("start_batch", "backward", "step", "end_batch"))
    start = time.perf_counter()
    for _ in range(batches):
        start_batch()
        backward()
        step()
        end_batch()
    return (time.perf_counter() - start) / batches * 1e6


def ema_update_only(steps: int) -> float:
    """us for one ``EMA`` update of the benchmark's model (its ``on_exit_step``), alone."""
    model, optimizer = make_model()
    ema = st.callbacks.EMA(0.999)
    trainer = st.Trainer(model, optimizer, nn.MSELoss(), [st.Phase("train", [(torch.randn(4, 32), torch.randn(4, 1))])],
                         callbacks=[ema], device=DEVICE)  # fmt: skip
    trainer.fit()  # the average made, the step counted
    update = ema.on_exit_step
    start = time.perf_counter()
    for _ in range(steps):
        update(trainer)
    return (time.perf_counter() - start) / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=2000, help="batches per timed run")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()

    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    batches = [(torch.randn(64, 32, device=DEVICE), torch.randn(64, 1, device=DEVICE)) for _ in range(args.batches)]
    dataset = TensorDataset(*(torch.cat(parts).cpu() for parts in zip(*batches, strict=True)))
    synchronize = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    loops: dict[str, Factory] = {"hand-written": hand_loop, "statetrainer": statetrainer_loop,
                                 "run_until": run_until_loop, "batches=K": stream_loop,
                                 "GoodputLedger": ledger_loop, "EMA": ema_loop}  # fmt: skip
    if importlib.util.find_spec("ignite") is not None:
        loops["ignite"] = ignite_loop
    print(
        f"torch {torch.__version__} on {DEVICE}, {args.batches} batches x {args.rounds} rounds, 1 thread, median us/batch"
    )
    for label, make_data in (("pre-built batches", lambda: batches),
                             ("shuffled DataLoader", lambda: DataLoader(dataset, batch_size=64, shuffle=True))):  # fmt: skip
        print(f"{label}:")
        compare(loops, make_data, args.batches, args.rounds, synchronize)
    machine = statistics.median(machine_only(args.batches * 10) for _ in range(5))
    print(f"the bare machine: {machine:.2f} us for a batch's four transitions")
    marked = statistics.median(machine_only(args.batches * 10, ledger=True) for _ in range(5))
    print(f"with a GoodputLedger's marks: {marked:.2f} us (+{marked - machine:.2f} us a batch)")
    update = statistics.median(ema_update_only(args.batches * 5) for _ in range(5))
    print(f"an EMA(0.999) update of this model alone: {update:.2f} us a step")


def compare(loops: dict[str, Factory], make_data: Callable[[], Iterable], batches: int, rounds: int,
            synchronize: Callable[[], None]) -> None:  # fmt: skip
    """Time every loop on fresh data from ``make_data``, interleaved, and print the medians."""
    timings: dict[str, list[float]] = {name: [] for name in loops}
    for factory in loops.values():  # warm-up
        factory(make_data())()
    for _ in range(rounds):
        for name, factory in loops.items():
            run = factory(make_data())
            synchronize()
            start = time.perf_counter()
            run()
            synchronize()
            timings[name].append((time.perf_counter() - start) / batches * 1e6)
    report(timings, "hand-written", "us/batch")


if __name__ == "__main__":
    main()
