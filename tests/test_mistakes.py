"""The mistakes a new user makes are loud: each gets an error (or a line) that names it and what to do."""

from __future__ import annotations

import copy

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


def test_checkpoint_best_on_a_metric_nothing_produces_is_refused_when_the_trainer_is_built(device, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"Checkpoint monitors 'val_loss', which no callback produces for the phases "
        r"train, valid; did you mean 'valid_loss'\? The callbacks produce train_loss, "
        r"valid_loss\.",
    ):
        linear_trainer(device, epochs=3, callbacks=[cb.SmoothedLoss(), cb.Checkpoint(tmp_path, best="val_loss")])
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_early_stopping_on_a_misspelled_metric_is_refused_when_the_trainer_is_built_suggesting_the_name(device):
    with pytest.raises(
        ValueError,
        match=r"EarlyStopping monitors 'val_los', which no callback produces for the phases "
        r"train, valid; did you mean 'valid_loss'\? The callbacks produce train_loss, "
        r"valid_loss\.",
    ):
        linear_trainer(device, epochs=3, callbacks=[cb.SmoothedLoss(), cb.EarlyStopping("val_los")])


def regression_phase() -> list[st.Phase]:
    return [st.Phase("train", regression_batches(2))]


def test_an_optimizer_built_on_another_model_is_refused_naming_the_foreign_parameters():
    model, other = nn.Linear(3, 1), nn.Linear(3, 1)
    with pytest.raises(
        ValueError,
        match=r"the optimizer holds 2 parameters that are not the model's \(of 2\).*"
        r"build it from this model: torch\.optim\.SGD\(model\.parameters\(\), \.\.\.\)",
    ):
        st.Trainer(model, torch.optim.SGD(other.parameters(), lr=0.1), F.mse_loss, regression_phase())
    twin = copy.deepcopy(model)  # equal values, other tensors: compared by identity
    with pytest.raises(ValueError, match=r"holds 2 parameters that are not the model's \(of 2\)"):
        st.Trainer(model, torch.optim.Adam(twin.parameters()), F.mse_loss, regression_phase())
    scale = nn.Parameter(torch.ones(()))  # say, a learnable loss weight kept outside the model
    with pytest.raises(
        ValueError,
        match=r"holds 1 parameter that is not the model's \(of 3\).*"
        r"torch\.optim\.Adam\(model\.parameters\(\), \.\.\.\)",
    ):
        st.Trainer(model, torch.optim.Adam([*model.parameters(), scale]), F.mse_loss, regression_phase())


def test_an_optimizer_over_some_of_the_models_parameters_trains_those_alone(device):
    torch.manual_seed(0)
    frozen, head = nn.Linear(3, 4), nn.Linear(4, 1)
    model = nn.Sequential(frozen, head)
    before = copy.deepcopy(model.state_dict())
    trainer = st.Trainer(model, torch.optim.SGD(head.parameters(), lr=0.1), F.mse_loss, regression_phase(),
                         device=device).fit()  # fmt: skip
    after = trainer.model.state_dict()
    assert all(torch.equal(after[name].cpu(), before[name]) for name in ("0.weight", "0.bias"))
    assert not torch.equal(after["1.weight"].cpu(), before["1.weight"])


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
