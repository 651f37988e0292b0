"""ResNet-18 training throughput: statetrainer against a hand-written loop and Lightning, eager and compiled.

Each mode (eager; compiled: ``Trainer(compile=True)``) is one pass. In a pass,
statetrainer's ``fit()`` drives its epochs and, after each one (outside its
timing), one epoch of the hand loop and one of Lightning (if it is installed:
``uv run --group bench``) run, so the kinds alternate round by round. They all
train the same torchvision ResNet-18 (compiled in place by the ``Trainer`` in the
compiled pass) with the same SGD + momentum, each in turn, on the same synthetic
batches, already on the device: the figures are the training loops' own, not a
data path's, nor where each model's memory happens to lie. Each epoch is timed
from its first batch to its last, the device caught up at both ends (statetrainer:
``on_enter_epoch`` to ``on_exit_epoch``; Lightning: ``on_train_epoch_start`` to
``on_train_epoch_end``, so neither's setup counts). The first round is a warm-up
(compilation, cuDNN's autotuner) and is left out. It prints the median images per
second of each kind and its ratio to the hand loop of the same mode; nothing is
asserted.

    uv run --group bench python benchmarks/resnet.py --device cuda     # batch 256, 224x224, 50 batches an epoch
    uv run --group bench python benchmarks/resnet.py --device cpu --batch-size 16 --image-size 64 --batches 8
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10).to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def make_batches(device: torch.device, batch_size: int, image_size: int, count: int, distinct: int = 4) -> Batches:
    generator = torch.Generator().manual_seed(0)
    made = [(torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device),
             torch.randint(0, 10, (batch_size,), generator=generator).to(device)) for _ in range(distinct)]  # fmt: skip
    return [made[index % distinct] for index in range(count)]


def hand_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Batches) -> None:
    model.train()
    for inputs, target in batches:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), target).backward()
        optimizer.step()


def lightning_epoch_runner(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                           batches: Batches) -> Callable[[], float] | None:  # fmt: skip
    """One Lightning epoch a call (a new ``lightning.Trainer`` each time, its setup outside the timing), or None
    when Lightning is not installed."""
    try:
        import lightning
    except ImportError as error:  # not installed, or a package it needs is missing
        print(f"Lightning does not import ({error}): its rows are left out")
        return None

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # its per-fit banner and tips
    warnings.filterwarnings("ignore", module="lightning")

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
            inputs, target = batch
            return F.cross_entropy(self.model(inputs), target)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return optimizer

    class EpochTimer(lightning.Callback):
        def __init__(self) -> None:
            self.seconds, self.started = 0.0, 0.0

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            synchronize(device)
            self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            synchronize(device)
            self.seconds = time.perf_counter() - self.started

    class OneLoader:  # Lightning takes a list as a list of loaders
        def __iter__(self) -> Any:
            return iter(batches)

        def __len__(self) -> int:
            return len(batches)

    def epoch() -> float:
        timer = EpochTimer()
        trainer = lightning.Trainer(max_epochs=1, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer])  # fmt: skip
        trainer.fit(Module(), train_dataloaders=OneLoader())
        model.to(device)  # Lightning's teardown moved the model and the optimizer's state to the CPU
        for state in optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = value.to(device)
        return timer.seconds

    return epoch


class Rounds(st.Callback):
    """Times statetrainer's epochs and, after each, runs one epoch of every other kind."""

    def __init__(self, device: torch.device, others: dict[str, Callable[[], float]]) -> None:
        self.device, self.others, self.started = device, others, 0.0
        self.seconds: dict[str, list[float]] = {"statetrainer": [], **{name: [] for name in others}}

    def on_enter_epoch(self, trainer: st.Trainer) -> None:
        synchronize(self.device)
        self.started = time.perf_counter()

    def on_exit_epoch(self, trainer: st.Trainer) -> None:
        synchronize(self.device)
        self.seconds["statetrainer"].append(time.perf_counter() - self.started)
        for name, epoch in self.others.items():
            self.seconds[name].append(epoch())


def timed_hand_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                     batches: Batches) -> Callable[[], float]:  # fmt: skip
    def epoch() -> float:
        synchronize(device)
        started = time.perf_counter()
        hand_epoch(model, optimizer, batches)
        synchronize(device)
        return time.perf_counter() - started

    return epoch


def run_pass(device: torch.device, compiled: bool, batches: Batches, rounds: int) -> dict[str, list[float]]:
    model, optimizer = build(device)  # the Trainer compiles it in place, for every kind
    others = {"hand loop": timed_hand_epoch(model, optimizer, device, batches)}
    lightning_epoch = lightning_epoch_runner(model, optimizer, device, batches)
    if lightning_epoch is not None:
        others["Lightning"] = lightning_epoch
    timer = Rounds(device, others)
    st.Trainer(model, optimizer, F.cross_entropy, [st.Phase("train", batches)], callbacks=[timer],
               epochs=rounds + 1, device=device, compile=compiled).fit()  # fmt: skip
    return {name: seconds[1:] for name, seconds in timer.seconds.items()}  # the first round warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=50, help="batches an epoch (a round)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, after one warm-up round")
    parser.add_argument("--modes", default="eager,compiled")
    arguments = parser.parse_args()
    device = torch.device(arguments.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(device)}")
    else:
        print(f"device: cpu, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, statetrainer {st.__version__}; ResNet-18, batch {arguments.batch_size}, "
          f"{arguments.image_size}x{arguments.image_size}, {arguments.batches} batches a round, {arguments.rounds} "
          "rounds after a warm-up; medians")  # fmt: skip
    batches = make_batches(device, arguments.batch_size, arguments.image_size, arguments.batches)
    images = arguments.batch_size * arguments.batches
    for mode in arguments.modes.split(","):
        seconds = run_pass(device, mode == "compiled", batches, arguments.rounds)
        hand = statistics.median(seconds["hand loop"])
        for name, measured in seconds.items():
            median = statistics.median(measured)
            print(f"{mode:>8}  {name:<12} {images / median:9.1f} images/s  {hand / median:5.3f}x the hand loop  "
                  f"(rounds: {', '.join(f'{value * 1000:.0f}' for value in measured)} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
