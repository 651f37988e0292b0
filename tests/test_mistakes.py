"""The mistakes a new user makes are loud: each gets an error (or a line) that names it and what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer import callbacks as cb

from .conftest import regression_batches
from .test_trainer import linear_trainer


class LightningNames(st.Callback):
    def on_batch_end(self, trainer):  # Keras' and Lightning's name: never called here
        pass


class Plural(st.Callback):
    def on_enter_backwards(self, trainer):
        pass


@pytest.mark.parametrize(("callback", "message"), [
    (LightningNames(), r"LightningNames defines on_batch_end, which is not a hook .*did you mean on_exit_batch\?"),
    (Plural(), r"Plural defines on_enter_backwards, which is not a hook .*did you mean on_enter_backward\?"),
], ids=["lightning-name", "misspelled"])  # fmt: skip
def test_a_method_named_like_a_hook_that_is_none_is_refused_naming_the_closest_hook(device, callback, message):
    with pytest.raises(TypeError, match=message):
        linear_trainer(device, callbacks=[callback])


def test_checkpoint_best_takes_a_metric_name_and_refuses_a_flag():
    with pytest.raises(TypeError, match=r"best is the name of a metric .*best='valid_accuracy'.*not True"):
        cb.Checkpoint("folder", best=True)
    assert cb.Checkpoint("folder", best="valid_accuracy").best_mode == "max"
    assert cb.Checkpoint("folder", best="valid_loss").best_mode == "min"


def test_checkpoint_best_on_a_metric_nothing_produces_fails_after_the_first_epoch_listing_the_metrics(device, tmp_path):
    trainer, _ = linear_trainer(device, epochs=3, callbacks=[cb.SmoothedLoss(), cb.Checkpoint(tmp_path, best="val_loss")])
    with pytest.raises(KeyError, match=r"best='val_loss'\): no such metric; trainer.metrics has train_loss, valid_loss"):
        trainer.fit()
    assert trainer.epoch == 0  # at the end of the first epoch, not later


def test_an_early_stop_says_why_and_when(device, capsys):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    stopper = cb.EarlyStopping("valid_loss", patience=1, min_delta=1e9)  # nothing counts as better
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.mse_loss,
                         [st.Phase("train", regression_batches(2)), st.Phase("valid", regression_batches(1), grad=False)],
                         callbacks=[cb.SmoothedLoss(), stopper], epochs=5, device=device)  # fmt: skip
    trainer.fit()
    assert trainer.position.stop_requested and trainer.position.epochs_done == 2
    out = capsys.readouterr().out
    assert "EarlyStopping: valid_loss has not improved on" in out and "stopping after epoch 2" in out


def test_a_batch_that_is_not_a_pair_without_unpack_names_unpack(device):
    model = nn.Linear(3, 1)
    batches = [torch.randn(4, 3)]  # a bare tensor: no target
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, [st.Phase("train", batches)],
                         device=device)  # fmt: skip
    with pytest.raises(TypeError, match=r"unpack=lambda batch: \(input, target\) to the Trainer"):
        trainer.fit()

