"""statetrainer: a PyTorch training loop that is a finite-state machine.

    import statetrainer as st
    trainer = st.Trainer(model, optimizer, loss_fn,
                         phases=[st.Phase("train", train_loader), st.Phase("valid", valid_loader, grad=False)],
                         callbacks=[...], epochs=3)
    trainer.fit()                    # or step: trainer.advance(), trainer.run_until("backward")
"""

from . import callbacks
from .callbacks import Callback
from .machine import STATES, TRANSITIONS, InvalidMove, Move
from .phase import Phase
from .trainer import Trainer, unpack_pair

__version__ = "0.1.0"

__all__ = [
    "STATES",
    "TRANSITIONS",
    "Callback",
    "InvalidMove",
    "Move",
    "Phase",
    "Trainer",
    "__version__",
    "callbacks",
    "unpack_pair",
]
