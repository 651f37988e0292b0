"""``EMA``: an exponential moving average of the weights, exact across resumes, and what evaluation runs on."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer.callbacks import EMA, SmoothedLoss
from statetrainer.checkpoint import CheckpointError
from statetrainer.cli import main

from ..checkpoint.test_trainer_checkpoints import advance_to

TRAIN, VALID = 10, 4  # batches of 8 an epoch


def data() -> tuple[list, list]:
    generator = torch.Generator().manual_seed(5)
    inputs, labels = (
        torch.randn((TRAIN + VALID) * 8, 6, generator=generator),
        torch.randint(0, 3, ((TRAIN + VALID) * 8,), generator=generator),
    )
    batches = [(inputs[index : index + 8], labels[index : index + 8]) for index in range(0, len(inputs), 8)]
    return batches[:TRAIN], batches[TRAIN:]


def build(*callbacks: st.Callback, device, epochs: int = 3) -> st.Trainer:
    """Dropout and BatchNorm (buffers averaged, a batch count copied), Adam, a validation phase."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    train, valid = data()
    return st.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), F.cross_entropy,
                      [st.Phase("train", train), st.Phase("valid", valid, grad=False)],
                      callbacks=[SmoothedLoss(), *callbacks], epochs=epochs, device=device, seed=2)  # fmt: skip


class WeightsAfterEachStep(st.Callback):
    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_exit_step(self, trainer: st.Trainer) -> None:
        self.seen.append({key: value.detach().clone() for key, value in trainer.model.state_dict().items()})


def test_the_average_is_the_decayed_sum_of_the_weights_after_each_update(device):
    """Listed after it, a recorder sees the weights each update used; the average is, bit for bit, the lerp of
    them from the starting weights (a float tensor's; a batch count is copied), every 3 steps."""
    ema, recorder = EMA(0.8, every_steps=3), WeightsAfterEachStep()
    trainer = build(ema, recorder, device=device)
    start = {key: value.detach().clone() for key, value in trainer.model.state_dict().items()}
    trainer.fit()
    assert ema.updates == 3 * TRAIN // 3
    expected = start
    for step, weights in enumerate(recorder.seen, 1):
        if step % 3 == 0:
            expected = {key: torch.lerp(value, weights[key], 1 - 0.8) if value.is_floating_point() else weights[key]
                        for key, value in expected.items()}  # fmt: skip
    assert ema.averaged is not None and ema.averaged.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(ema.averaged[key], value), key


def test_evaluation_runs_on_the_average_and_training_on_the_raw_weights(device, tmp_path):
    """The validation loss equals a hand evaluation of the averaged weights; the raw weights end exactly as
    those of a run whose evaluation used them (training never sees the average)."""
    ema = EMA(0.9)
    trainer = build(ema, st.callbacks.Checkpoint(tmp_path, every_epochs=1), device=device).fit()
    plain = build(EMA(0.9, evaluate_with=False), device=device).fit()
    for (key, value), other in zip(trainer.model.state_dict().items(), plain.model.state_dict().values(),
                                   strict=True):  # fmt: skip
        assert torch.equal(value, other), key
    assert trainer.metrics["valid_loss"] != plain.metrics["valid_loss"]
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    st.load_weights(model, tmp_path, averaged=True)
    model.to(device).eval()
    _, valid = data()
    with torch.no_grad():
        total = sum(F.cross_entropy(model(inputs.to(device)), labels.to(device)).double() * len(labels)
                    for inputs, labels in valid)  # fmt: skip
    assert float(total / (VALID * 8)) == pytest.approx(trainer.metrics["valid_loss"], rel=1e-6)
    assert main(["export", str(tmp_path), str(tmp_path / "averaged.safetensors"), "--averaged"]) == 0
    exported = load_file(tmp_path / "averaged.safetensors")
    assert ema.averaged is not None
    assert all(torch.equal(exported[key], value.cpu()) for key, value in ema.averaged.items())


@pytest.mark.parametrize("where", [(1, "train", 4), (1, "valid", 1)], ids=["in-training", "in-validation"])
def test_a_resumed_run_ends_with_the_average_of_the_run_never_stopped(device, tmp_path, where):
    """Saved mid-epoch, or in the validation while the model holds the averaged weights: a new trainer loads it and
    ends with the weights, the optimizer and the average of the uninterrupted run, bit for bit; the checkpoint's
    plain weights (``load_weights``) are the raw ones either way."""
    whole_ema = EMA(0.9)
    whole = build(whole_ema, device=device).fit()
    first = build(EMA(0.9), device=device)
    advance_to(first, *where)
    raw = {key: value.detach().clone() for key, value in first.callbacks[1]._raw.items()} if where[1] == "valid" else (
        {key: value.detach().clone() for key, value in first.model.state_dict().items()})  # fmt: skip
    path = first.save_checkpoint(tmp_path / "mid.safetensors")
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    st.load_weights(model, path)
    assert all(torch.equal(model.state_dict()[key], value.cpu()) for key, value in raw.items())
    without = build(device=device)
    before = {key: value.detach().clone() for key, value in without.model.state_dict().items()}
    if where[1] == "valid":  # its model part is the average: without the EMA it is refused, nothing loaded
        with pytest.raises(CheckpointError, match="EMA: the checkpoint needs this callback to load: it was saved "
                                                  "during an evaluation phase"):  # fmt: skip
            without.load_checkpoint(path)
        assert all(torch.equal(value, without.model.state_dict()[key]) for key, value in before.items())
    else:
        assert without.load_checkpoint(path) == path  # the EMA's state is left aside
    resumed_ema = EMA(0.9)
    resumed = build(resumed_ema, device=device)
    resumed.load_checkpoint(path)
    resumed.fit()
    for (key, value), other in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(),
                                   strict=True):  # fmt: skip
        assert torch.equal(value, other), key
    assert whole_ema.averaged is not None and resumed_ema.averaged is not None
    for key, value in whole_ema.averaged.items():
        assert torch.equal(value, resumed_ema.averaged[key]), key
    assert whole.metrics == resumed.metrics and whole_ema.updates == resumed_ema.updates


def test_bad_settings_and_a_checkpoint_of_another_decay_are_refused(device, tmp_path):
    for decay in (0, 1, 1.5, "0.9", True):
        with pytest.raises(ValueError, match="decay is a number between 0 and 1"):
            EMA(decay)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every_steps is a positive integer"):
        EMA(0.9, every_steps=0)
    trainer = build(EMA(0.9), device=device, epochs=1).fit()
    path = trainer.save_checkpoint(tmp_path / "end.safetensors")
    other = build(EMA(0.99), device=device, epochs=2)
    with pytest.raises(CheckpointError, match="decay 0.9, this EMA's is 0.99"):
        other.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="holds no averaged weights"):
        st.load_weights(nn.Linear(2, 2), build(device=device, epochs=1).fit().save_checkpoint(tmp_path / "plain.safetensors"),
                        averaged=True)  # fmt: skip


def test_one_callback_may_swap_the_weights_for_evaluation(device):
    with pytest.raises(ValueError, match="each put their weights into the model for evaluation"):
        build(EMA(0.9, name="fast"), EMA(0.99, name="slow"), device=device)
    build(EMA(0.9, name="fast"), EMA(0.99, name="slow", evaluate_with=False), device=device)  # one swaps: fine


def test_an_evaluation_cut_short_leaves_the_model_on_its_raw_weights(device):
    """``validation()`` stepped into its first batch (the average in the model) and left: the raw weights are
    back, bit for bit, and the run goes on as one never evaluated."""
    trainer = build(EMA(0.9), device=device, epochs=2)
    trainer.run_until("epoch", epoch=1)  # after the first epoch: the average has moved away from the weights
    raw = {key: value.detach().clone() for key, value in trainer.model.state_dict().items()}
    with trainer.validation() as evaluation:
        evaluation.run_until("batch")
        assert not all(torch.equal(value, raw[key]) for key, value in trainer.model.state_dict().items())
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, raw[key]), key


def test_a_bf16_models_average_is_kept_in_float32_and_rounded_to_bf16_where_it_is_used(device, tmp_path):
    """A bf16 model, decay 0.999: the average is float32, bit for bit the float32 lerp of the bf16 weights (in
    bf16, (1 - 0.999) times a change rounds away); the evaluation swap, a resume and ``load_weights(averaged=True)``
    give it rounded to bf16; the swap puts the raw bf16 weights back."""

    def bf16_run(*callbacks: st.Callback, folder=None) -> st.Trainer:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(torch.bfloat16)
        train, valid = data()
        train = [(inputs.to(torch.bfloat16), labels) for inputs, labels in train]
        valid = [(inputs.to(torch.bfloat16), labels) for inputs, labels in valid]
        saving = [st.callbacks.Checkpoint(folder, every_epochs=1)] if folder is not None else []
        return st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy,
                          [st.Phase("train", train), st.Phase("valid", valid, grad=False)],
                          callbacks=[*callbacks, *saving], epochs=2, device=device, seed=2)  # fmt: skip

    class SeenInValidation(st.Callback):
        def on_enter_batch(self, trainer: st.Trainer) -> None:
            if not trainer.phase.grad:
                self.weights = {key: value.detach().clone() for key, value in trainer.model.state_dict().items()}

    ema, recorder, seen = EMA(0.999), WeightsAfterEachStep(), SeenInValidation()
    trainer = bf16_run(ema, recorder, seen, folder=tmp_path / "run")
    start = {key: value.detach().float() for key, value in trainer.model.state_dict().items()}
    trainer.fit()
    expected = start
    for weights in recorder.seen:
        expected = {key: torch.lerp(value, weights[key].float(), 1 - 0.999) for key, value in expected.items()}
    assert ema.averaged is not None
    for key, value in expected.items():
        assert ema.averaged[key].dtype == torch.float32 and torch.equal(ema.averaged[key], value), key
    assert any(not torch.equal(value.to(torch.bfloat16).float(), start[key]) for key, value in expected.items())
    assert all(torch.equal(seen.weights[key], value.to(torch.bfloat16)) for key, value in ema.averaged.items())
    assert all(value.dtype == torch.bfloat16 for value in trainer.model.state_dict().values())
    assert torch.equal(trainer.model.state_dict()["0.weight"], recorder.seen[-1]["0.weight"])  # raw, back
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(torch.bfloat16)
    st.load_weights(model, tmp_path / "run", averaged=True)
    assert all(torch.equal(model.state_dict()[key], value.to(torch.bfloat16)) for key, value in ema.averaged.items())
    resumed_ema = EMA(0.999)
    resumed = bf16_run(resumed_ema, folder=tmp_path / "run")
    resumed.load_checkpoint(tmp_path / "run")
    assert resumed_ema.averaged is not None
    assert all(torch.equal(resumed_ema.averaged[key], value) for key, value in ema.averaged.items())


def test_a_bf16_average_saved_in_bf16_resumes_widened_to_float32(device, tmp_path):
    """A checkpoint whose average of bf16 weights was kept in bf16 (as before averages were widened) resumes: the
    average goes on in float32 from the saved values."""
    from statetrainer.checkpoint import read_tree, write_tree

    def bf16_run(ema: EMA) -> st.Trainer:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(torch.bfloat16)
        train, _ = data()
        return st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy,
                          [st.Phase("train", [(inputs.to(torch.bfloat16), labels) for inputs, labels in train])],
                          callbacks=[ema], epochs=2, device=device, seed=2)  # fmt: skip

    first = bf16_run(EMA(0.9))
    advance_to(first, 1, "train", 3)
    path = first.save_checkpoint(tmp_path / "mid.safetensors")
    state = read_tree(path)
    state["callbacks"]["EMA"]["averaged"] = {key: value.to(torch.bfloat16)
                                             for key, value in state["callbacks"]["EMA"]["averaged"].items()}  # fmt: skip
    write_tree(path, state, st.__version__)
    ema = EMA(0.9)
    resumed = bf16_run(ema)
    resumed.load_checkpoint(path)
    resumed.fit()
    assert ema.averaged is not None and all(value.dtype == torch.float32 for value in ema.averaged.values())
    assert ema.updates == 2 * TRAIN
