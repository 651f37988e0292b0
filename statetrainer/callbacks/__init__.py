"""Callbacks: every feature of a run (metrics, schedulers, loggers, checkpoints) is one."""

from .base import HOOK_NAMES, Callback, TrainerView, overridden_hooks
from .checkpoint import Checkpoint
from .debugging import Breakpoint
from .early_stopping import EarlyStopping
from .ema import EMA
from .finite import NonFiniteError, StopOnNonFinite
from .goodput import GoodputLedger
from .loggers import CSVLogger, StreamLogger, learning_rates
from .metrics import Accuracy, Metric, SmoothedLoss, running_metrics
from .plots import Plots
from .progress import ProgressBar
from .schedulers import CosineWarmRestarts, OneCycle, ParamScheduler, TorchScheduler, anneal
from .tensorboard import TensorBoardLogger, TensorBoardTracker
from .trackers import MLflowLogger, Tracker, TrackerLogger, WandbLogger

__all__ = [
    "HOOK_NAMES",
    "Accuracy",
    "Breakpoint",
    "CSVLogger",
    "Callback",
    "TrainerView",
    "Checkpoint",
    "CosineWarmRestarts",
    "EMA",
    "EarlyStopping",
    "GoodputLedger",
    "Metric",
    "NonFiniteError",
    "OneCycle",
    "ParamScheduler",
    "Plots",
    "ProgressBar",
    "SmoothedLoss",
    "StopOnNonFinite",
    "StreamLogger",
    "TensorBoardLogger",
    "TensorBoardTracker",
    "MLflowLogger",
    "Tracker",
    "TrackerLogger",
    "WandbLogger",
    "TorchScheduler",
    "anneal",
    "learning_rates",
    "overridden_hooks",
    "running_metrics",
]
