"""A small run that resumes itself: the subject of the goodput ledger's and the trackers' kill-and-restart tests.

    python small_run.py FOLDER [--kill-at-step S] [--device D] [--background] [--mlflow URI] [--wandb DIR]

It trains a small MLP on 32 batches per epoch for 3 epochs, validating on 8
batches after each, with a checkpoint every 10 steps and at each epoch's end;
started again with the same FOLDER it continues from the newest checkpoint.
``--kill-at-step`` makes it SIGKILL itself as it leaves the batch that took
step S. It ends with ``os._exit(0)``: Python's own finalization after that
(about a second with torch loaded, on the 2-core test machine) comes after the
last moment any code of a process can record, so it is in no ledger.
It keeps a ``GoodputLedger`` in FOLDER; ``--mlflow URI`` also logs to MLflow
(every 2 steps and every epoch), ``--wandb DIR`` to an offline W&B run in DIR.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer import callbacks as cb


class KillAtStep(st.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_exit_batch(self, trainer: st.Trainer) -> None:
        if trainer.phase.grad and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--background", action="store_true")
    parser.add_argument("--mlflow", help="an MLflow tracking URI to log to")
    parser.add_argument("--wandb", help="a folder W&B writes an offline run in")
    options = parser.parse_args()
    torch.manual_seed(0)
    inputs, labels = torch.randn(512, 64), torch.randint(0, 4, (512,))
    batches = [(inputs[start : start + 16], labels[start : start + 16]) for start in range(0, 512, 16)]
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4))
    callbacks: list[st.Callback] = [cb.GoodputLedger(options.folder), cb.SmoothedLoss(),
                                    cb.Checkpoint(options.folder, every_steps=10, background=options.background)]  # fmt: skip
    if options.mlflow:
        callbacks.append(cb.MLflowLogger(options.mlflow, experiment="small-run", every_steps=2))
    if options.wandb:
        callbacks.append(cb.WandbLogger("small-run", mode="offline", dir=options.wandb, every_steps=2))
    if options.kill_at_step is not None:
        callbacks.append(KillAtStep(options.kill_at_step))
    trainer = st.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-3), F.cross_entropy,
                         phases=[st.Phase("train", batches), st.Phase("valid", batches[:8], grad=False)],
                         callbacks=callbacks, epochs=3, device=options.device, seed=3)  # fmt: skip
    trainer.load_checkpoint(options.folder)
    trainer.fit()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
