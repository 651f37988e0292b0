"""statetrainer: a PyTorch training loop that is a finite-state machine.

import statetrainer as st
trainer = st.Trainer(model, optimizer, loss_fn,
                     phases=[st.Phase("train", train_loader), st.Phase("valid", valid_loader, grad=False)],
                     callbacks=[..., st.callbacks.Checkpoint("checkpoints/run1")], epochs=3, seed=0)
trainer.load_checkpoint("checkpoints/run1")   # resume exactly, if a checkpoint is there
trainer.fit()                    # or step: trainer.advance(), trainer.run_until("backward")
"""

from . import callbacks
from .bisecting import bisect
from .callbacks import Callback
from .diffing import diff_checkpoints
from .errors import CheckpointError, InvalidMove, Preempted
from .machine import STATES, TRANSITIONS, Move, diagram
from .phase import Phase
from .rng import seed_everything
from .summary import summary
from .trainer import Trainer, unpack_pair
from .version import __version__
from .weights import export_weights, load_weights

__all__ = [
    "STATES",
    "TRANSITIONS",
    "Callback",
    "CheckpointError",
    "InvalidMove",
    "Move",
    "Phase",
    "Preempted",
    "Trainer",
    "__version__",
    "bisect",
    "callbacks",
    "diagram",
    "diff_checkpoints",
    "export_weights",
    "load_weights",
    "seed_everything",
    "summary",
    "unpack_pair",
]
