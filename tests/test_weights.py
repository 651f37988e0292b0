"""Model weights out of a run's checkpoints: load_weights into a plain model, export to a plain safetensors file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer.callbacks import Checkpoint
from statetrainer.cli import main

from .conftest import regression_batches


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))


def trained(folder: Path, device: torch.device, wrap=lambda model: model) -> nn.Module:
    """A model trained two epochs with a checkpoint per epoch (and the best one) in ``folder``; the bare model."""
    torch.manual_seed(0)
    model = make_model()
    phases = [st.Phase("train", regression_batches(4)), st.Phase("valid", regression_batches(2, seed=1), grad=False)]
    callbacks = [st.callbacks.SmoothedLoss(), Checkpoint(folder, every_epochs=1, best="valid_loss")]
    st.Trainer(wrap(model), torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, phases, callbacks=callbacks,
               epochs=2, device=device).fit()  # fmt: skip
    return model


def same_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == weights.keys() and all(torch.equal(state[key].cpu(), weights[key].cpu()) for key in state)


@pytest.mark.parametrize("wrapping", ["plain", "compiled"])
def test_export_round_trips_through_load_file_into_a_plain_model(device, tmp_path, wrapping):
    wrap = (lambda model: torch.compile(model, backend="eager")) if wrapping == "compiled" else (lambda model: model)
    model = trained(tmp_path / "run", device, wrap)
    out = tmp_path / "model.safetensors"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    weights = load_file(out)
    assert same_weights(model, weights)  # the model's own keys: no step/model/ nor _orig_mod. prefix
    fresh = make_model()
    fresh.load_state_dict(weights, strict=True)
    assert same_weights(fresh, model.state_dict())


def test_export_of_a_ddp_wrapped_model_has_the_bare_models_keys(device, tmp_path):
    if device.type != "cpu":
        pytest.skip("one gloo process group in this process is enough to check the keys")
    distributed = torch.distributed
    distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = make_model()
        wrapped = nn.parallel.DistributedDataParallel(model)
        st.export_weights(_checkpoint_of(wrapped, tmp_path, device), tmp_path / "model.safetensors")
    finally:
        distributed.destroy_process_group()
    weights = load_file(tmp_path / "model.safetensors")
    assert same_weights(model, weights) and not any(key.startswith("module.") for key in weights)
    make_model().load_state_dict(weights, strict=True)


def _checkpoint_of(model: nn.Module, tmp_path: Path, device: torch.device) -> Path:
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss,
                         [st.Phase("train", regression_batches(2))], device=device)  # fmt: skip
    trainer.fit()
    return trainer.save_checkpoint(tmp_path / "run" / "final.safetensors")


def test_load_weights_takes_a_file_a_folder_or_the_best_copy(device, tmp_path):
    model = trained(tmp_path / "run", device)
    for path in (
        tmp_path / "run",
        tmp_path / "run" / "best.safetensors",
        st.checkpoint.checkpoint_files(tmp_path / "run")[-1],
    ):
        fresh = make_model()
        assert st.load_weights(fresh, path).exists()
        assert same_weights(fresh, st.weights.checkpoint_weights(path)[1])
    newest = make_model()
    st.load_weights(newest, tmp_path / "run")
    assert same_weights(newest, model.state_dict())  # the folder's newest is the end of the run


def test_load_weights_refuses_another_model_naming_its_keys_and_changes_nothing(device, tmp_path):
    trained(tmp_path / "run", device)
    other = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1), nn.Linear(1, 1))
    before = {key: value.clone() for key, value in other.state_dict().items()}
    with pytest.raises(st.CheckpointError, match=r"missing keys .*3\.weight.*") as raised:
        st.load_weights(other, tmp_path / "run")
    assert "3.bias" in str(raised.value)
    assert same_weights(other, before)
    narrower = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    with pytest.raises(st.CheckpointError, match=r"0\.weight: shape \(4, 3\) in the checkpoint, \(2, 3\) in the model"):
        st.load_weights(narrower, tmp_path / "run")
    renamed = nn.Module()
    renamed.first = nn.Linear(3, 4)
    with pytest.raises(st.CheckpointError, match=r"missing keys .*first\.weight.*unexpected keys .*0\.weight"):
        st.load_weights(renamed, tmp_path / "run")


def test_export_refuses_a_bad_target_and_never_overwrites(device, tmp_path, capsys):
    trained(tmp_path / "run", device)
    kept = tmp_path / "mine.safetensors"
    kept.write_bytes(b"the user's own file")
    assert main(["export", str(tmp_path / "run"), str(kept)]) == 2
    assert "exists already" in capsys.readouterr().err and kept.read_bytes() == b"the user's own file"
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "model.pt")]) == 2
    assert "'.safetensors'" in capsys.readouterr().err and not (tmp_path / "model.pt").exists()
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "out.safetensors")]) == 2
    assert not (tmp_path / "out.safetensors").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(st.CheckpointError, match="holds no checkpoint"):
        st.export_weights(tmp_path / "empty", tmp_path / "out.safetensors")
