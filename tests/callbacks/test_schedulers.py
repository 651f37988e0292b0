"""Parameter schedules against torch's schedulers and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer.callbacks import CosineWarmRestarts, OneCycle, ParamScheduler, SmoothedLoss, TorchScheduler
from statetrainer.checkpoint import CheckpointError, read_tree, write_tree

from ..conftest import regression_batches


def schedule_seen(
    scheduler: st.Callback, steps: int, device: torch.device, optimizer_cls=torch.optim.SGD, groups=1, **options
):
    """Run ``steps`` optimizer steps and return each step's param groups as the optimizer used them."""
    model = nn.Linear(3, 1)
    params = [{"params": [model.weight]}, {"params": [model.bias]}][:groups] if groups > 1 else model.parameters()
    optimizer = optimizer_cls(params, lr=1.0, **options)
    used = []

    class Recorder(st.Callback):
        def on_exit_step(self, trainer):  # after the step: what the optimizer just used
            used.append([dict(group, params=None) for group in trainer.optimizer.param_groups])

    trainer = st.Trainer(model, optimizer, F.mse_loss, [st.Phase("train", regression_batches(steps))],
                         callbacks=[scheduler, Recorder()], device=device)  # fmt: skip
    trainer.fit()
    return used


def torch_values(make_scheduler, steps: int, key="lr", optimizer_cls=torch.optim.SGD, **options):
    optimizer = optimizer_cls(nn.Linear(3, 1).parameters(), lr=1.0, **options)
    scheduler = make_scheduler(optimizer)
    values = []
    for _ in range(steps):
        group = optimizer.param_groups[0]
        values.append(group[key] if key != "beta1" else group["betas"][0])
        optimizer.step()
        scheduler.step()
    return values


def test_cosine_warm_restarts_matches_torch(device: torch.device):
    steps = 70
    ours = [
        s[0]["lr"] for s in schedule_seen(CosineWarmRestarts(0.1, period=10, min_value=0.001, t_mult=2), steps, device)
    ]
    theirs = torch_values(
        lambda opt: (
            [g.update(lr=0.1) for g in opt.param_groups]
            and torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10, T_mult=2, eta_min=0.001)
        ),
        steps,
    )
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


def test_cosine_warm_restarts_by_hand_at_restarts_with_decay():
    scheduler = CosineWarmRestarts(1.0, period=4, min_value=0.0, t_mult=2, decay=0.5)
    values = [scheduler.values(step, 1)[0] for step in range(13)]
    assert values[0] == 1.0 and values[2] == pytest.approx(0.5)  # half way down the first cycle
    assert values[4] == 0.5  # first restart: cycle of 8 steps at half the peak
    assert values[8] == pytest.approx(0.25)  # half way through the second cycle
    assert values[12] == 0.25  # second restart
    assert scheduler.cycle_position(11) == (1, 7, 8)


def test_one_cycle_matches_torch_with_cosine_warmup_and_momentum(device: torch.device):
    steps = 40
    ours = schedule_seen(OneCycle(0.1, total_steps=steps, pct_start=0.3, warmup="cos", cycle_momentum=True),
                         steps, device, momentum=0.9)  # fmt: skip
    make = lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps, pct_start=0.3)  # noqa: E731
    assert [s[0]["lr"] for s in ours] == pytest.approx(torch_values(make, steps, momentum=0.9), rel=1e-9)
    assert [s[0]["momentum"] for s in ours] == pytest.approx(
        torch_values(make, steps, key="momentum", momentum=0.9), rel=1e-9
    )


def test_one_cycle_linear_matches_torch_linear_and_cycles_adam_betas(device: torch.device):
    steps = 25
    ours = schedule_seen(OneCycle(0.01, total_steps=steps, warmup="linear", anneal="linear", cycle_momentum=True),
                         steps, device, optimizer_cls=torch.optim.Adam)  # fmt: skip
    make = lambda opt: torch.optim.lr_scheduler.OneCycleLR(  # noqa: E731
        opt, max_lr=0.01, total_steps=steps, pct_start=0.25, anneal_strategy="linear"
    )
    assert [s[0]["lr"] for s in ours] == pytest.approx(
        torch_values(make, steps, optimizer_cls=torch.optim.Adam), rel=1e-9
    )
    betas = torch_values(make, steps, key="beta1", optimizer_cls=torch.optim.Adam)
    assert [s[0]["betas"][0] for s in ours] == pytest.approx(betas, rel=1e-9)
    assert all(s[0]["betas"][1] == 0.999 for s in ours)


def test_one_cycle_seed_variant_by_hand():
    scheduler = OneCycle(1.0, total_steps=11, pct_start=0.5, div_factor=10, final_div_factor=100)
    values = [scheduler.values(step, 1)[0] for step in range(14)]
    assert values[0] == pytest.approx(0.1)  # start: peak / div_factor
    assert values[2] == pytest.approx(0.1 + 0.9 * 2 / 4.5)  # linear warm-up, the peak at step 4.5
    peak_step = 0.5 * 11 - 1
    assert values[5] == pytest.approx(0.001 + (1 - 0.001) / 2 * (math.cos(math.pi * 0.5 / (10 - peak_step)) + 1))
    assert values[10] == pytest.approx(0.001) and values[13] == pytest.approx(0.001)  # the floor, then held


def test_any_hyper_parameter_per_group(device: torch.device):
    used = schedule_seen(
        CosineWarmRestarts([0.2, 0.02], period=5, param="weight_decay"), 3, device, groups=2, weight_decay=0.0
    )
    assert [s[0]["weight_decay"] for s in used][0] == 0.2 and used[0][1]["weight_decay"] == 0.02
    assert used[0][0]["lr"] == 1.0  # untouched
    used = schedule_seen(CosineWarmRestarts(0.5, period=5, groups=[1]), 2, device, groups=2)
    assert used[0][0]["lr"] == 1.0 and used[0][1]["lr"] == 0.5


def test_torch_scheduler_wrapper_steps_and_saves_its_state(device: torch.device):
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    callback = TorchScheduler(torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5))
    trainer = st.Trainer(model, optimizer, F.mse_loss, [st.Phase("train", regression_batches(5))],
                         callbacks=[callback], device=device)  # fmt: skip
    trainer.fit()
    assert optimizer.param_groups[0]["lr"] == 0.25  # 5 steps: halved after steps 2 and 4
    assert callback.state_dict()["scheduler"]["last_epoch"] == 5


def test_reduce_on_plateau_reads_a_metric(device: torch.device):
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.1)

    class Flat(st.Callback):
        def metric_names(self, phases):
            return {"train_loss"}

        def on_exit_phase(self, trainer):
            trainer.metrics["train_loss"] = 1.0

    trainer = st.Trainer(model, optimizer, F.mse_loss, [st.Phase("train", regression_batches(1))],
                         callbacks=[Flat(), TorchScheduler(plateau, monitor="train_loss")], epochs=3, device=device)  # fmt: skip
    trainer.fit()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # no improvement after epochs 2 and 3


SCHEDULERS = {
    "StepLR": lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 2),
    "MultiStepLR": lambda optimizer: torch.optim.lr_scheduler.MultiStepLR(optimizer, [2, 4]),
    "ExponentialLR": lambda optimizer: torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9),
    "CosineAnnealingLR": lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10),
    "LambdaLR": lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.9**epoch),
    "OneCycleLR": lambda optimizer: torch.optim.lr_scheduler.OneCycleLR(optimizer, 1.0, total_steps=20),
    "CyclicLR": lambda optimizer: torch.optim.lr_scheduler.CyclicLR(optimizer, 0.01, 0.1),
    "ReduceLROnPlateau": lambda optimizer: torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer),
    "LinearLR": lambda optimizer: torch.optim.lr_scheduler.LinearLR(optimizer),
    "CosineAnnealingWarmRestarts": lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, 3),
    "PolynomialLR": lambda optimizer: torch.optim.lr_scheduler.PolynomialLR(optimizer, 5),
    "SequentialLR": lambda optimizer: torch.optim.lr_scheduler.SequentialLR(
        optimizer, [torch.optim.lr_scheduler.LinearLR(optimizer), torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9)],
        milestones=[2]),
    "ChainedScheduler": lambda optimizer: torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.LinearLR(optimizer), torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9)]),
}  # fmt: skip


@pytest.mark.parametrize("make", SCHEDULERS.values(), ids=SCHEDULERS.keys())
def test_a_torch_schedulers_own_state_after_a_checkpoint_file_fits_a_fresh_one(make, tmp_path):
    """No false refusals: each of torch's schedulers, stepped, saved through a file, fits a fresh copy of itself."""

    def wrapped() -> TorchScheduler:
        optimizer = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1, momentum=0.9)
        scheduler = make(optimizer)
        return TorchScheduler(scheduler, monitor="valid_loss" if "Plateau" in type(scheduler).__name__ else None)

    callback = wrapped()
    for _ in range(7):
        callback.scheduler.optimizer.step()
        callback.scheduler.step(*([1.0] if callback.monitor else []))
    path = write_tree(tmp_path / "scheduler.safetensors", callback.state_dict(), "test")
    fresh = wrapped()
    fresh.check_fits(read_tree(path))
    fresh.load_state_dict(read_tree(path))
    assert fresh.scheduler.get_last_lr() == callback.scheduler.get_last_lr()


@pytest.mark.parametrize(("key", "value", "message"), [
    ("last_epoch", -1, r"^scheduler\['last_epoch'\] is -1, not an integer >= 0$"),
    ("last_epoch", 2.0, r"^scheduler\['last_epoch'\] is 2.0, not an integer >= 0$"),
    ("gamma", "0.1", r"^scheduler\['gamma'\] is '0.1' \(a str\), not a finite number$"),
    ("base_lrs", [0.1, 0.1], r"^scheduler is not laid out as this run's: unexpected scheduler\['base_lrs'\]\[1\]$"),
    ("_last_lr", [float("inf")], r"^scheduler\['_last_lr'\]\[0\] is inf, not a finite number$"),
    ("optimizer", {"lr": 1.0}, r"^scheduler is not laid out as this run's: unexpected scheduler\['optimizer'\]\['lr'\]$"),
], ids=["epoch-negative", "epoch-float", "gamma-text", "lrs-longer", "lr-infinite", "optimizer-injected"])  # fmt: skip
def test_a_torch_scheduler_state_of_another_kind_is_refused_naming_the_key(key: str, value: object, message: str):
    callback = TorchScheduler(SCHEDULERS["StepLR"](torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)))
    state = callback.state_dict()
    with pytest.raises(CheckpointError, match=message):
        callback.check_fits({"scheduler": {**state["scheduler"], key: value}})


@pytest.mark.parametrize(("state", "message"), [
    ({"total_steps": 1}, r"^total_steps is 1, not an integer >= 2$"), ({"total_steps": True}, r"^total_steps is True"),
    ({"total_steps": 20, "x": 1}, r"^the saved state has unexpected key\(s\) 'x'$"), ([20], r"is a list of 1 item"),
])  # fmt: skip
def test_a_one_cycle_state_of_another_kind_is_refused_and_an_old_empty_one_fits(state: object, message: str):
    one_cycle = OneCycle(0.1, total_steps=20)
    one_cycle.check_fits({})  # saved before the cycle's length was
    one_cycle.check_fits({"total_steps": 30})
    with pytest.raises(CheckpointError, match=message):
        one_cycle.check_fits(state)


def test_bad_scheduler_arguments(device: torch.device):
    with pytest.raises(ValueError, match="cannot schedule 'lr\\[x\\]'"):
        ParamScheduler("lr[x]")
    with pytest.raises(ValueError, match="period"):
        CosineWarmRestarts(0.1, period=0)
    with pytest.raises(ValueError, match="annealing 'cubic'"):
        OneCycle(0.1, total_steps=10, anneal="cubic")
    with pytest.raises(ValueError, match="2 values for 1 param groups"):
        schedule_seen(CosineWarmRestarts([0.1, 0.2], period=3), 1, device)
    with pytest.raises(KeyError, match="no 'momentum'"):
        schedule_seen(CosineWarmRestarts(0.1, period=3, param="momentum"), 1, device, optimizer_cls=torch.optim.Adam)
    with pytest.raises(ValueError, match="monitor"):
        TorchScheduler(torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD(nn.Linear(1, 1).parameters())))


def test_one_cycle_with_a_warm_up_shorter_than_a_step_starts_at_the_peak():
    scheduler = OneCycle(1.0, total_steps=4, pct_start=0.25)
    assert scheduler.values(0, 1) == [1.0]
    assert scheduler.values(3, 1) == [pytest.approx(1.0 / 25 / 1e4)]


def test_a_plateau_scheduler_on_a_metric_nothing_produces_is_refused_when_the_trainer_is_built(device):
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    with pytest.raises(ValueError, match="TorchScheduler monitors 'valid_los'.*did you mean 'valid_loss'"):
        st.Trainer(model, optimizer, F.mse_loss, [st.Phase("train", regression_batches(2)),
                   st.Phase("valid", regression_batches(1), grad=False)],
                   callbacks=[SmoothedLoss(), TorchScheduler(plateau, monitor="valid_los")], device=device)  # fmt: skip


def test_one_cycle_without_a_length_spans_the_runs_total_steps(device: torch.device):
    def learning_rates(schedule: OneCycle, epochs: int) -> tuple[list[float], st.Trainer]:
        model, seen = nn.Linear(3, 1), []

        class Recorder(st.Callback):
            def on_exit_step(self, trainer):
                seen.append(trainer.optimizer.param_groups[0]["lr"])

        trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=1.0), F.mse_loss,
                             [st.Phase("train", regression_batches(5))], callbacks=[schedule, Recorder()],
                             accumulate=2, epochs=epochs, device=device)  # fmt: skip
        trainer.fit()
        return seen, trainer

    taken, trainer = learning_rates(OneCycle(1.0), epochs=3)
    assert len(taken) == trainer.total_steps == 9  # 3 steps an epoch: ceil(5 / 2)
    assert taken == learning_rates(OneCycle(1.0, total_steps=9), epochs=3)[0]
    assert taken[-1] == pytest.approx(1.0 / 25.0 / 1e4)  # the floor, at the run's last step


class Unsized:
    """Batches without a length, as a stream gives them."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        yield from self.batches


@pytest.mark.parametrize(
    ("loader", "error"),
    [(regression_batches(1), "takes 1 step.*at least 2"), (Unsized(regression_batches(3)), "total_steps is unknown")],
    ids=["one-step", "no-length"],
)
def test_one_cycle_without_a_length_refuses_a_run_it_cannot_span(device: torch.device, loader, error):
    model = nn.Linear(3, 1)
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=1.0), F.mse_loss, [st.Phase("train", loader)],
                         callbacks=[OneCycle(1.0)], device=device)  # fmt: skip
    with pytest.raises(ValueError, match=error):
        trainer.fit()
    assert trainer.global_step == 0


def test_cosine_without_a_period_is_one_cycle_over_a_run_counted_in_steps(device: torch.device):
    """An unsized stream taken 4 batches an epoch, stopped by max_steps: the run's total_steps is known, and the
    cosine (and a one-cycle) spans exactly it."""

    def learning_rates(schedule: st.Callback) -> tuple[list[float], st.Trainer]:
        model, seen = nn.Linear(3, 1), []

        class Recorder(st.Callback):
            def on_exit_step(self, trainer):
                seen.append(trainer.optimizer.param_groups[0]["lr"])

        stream = st.Phase("train", Unsized(regression_batches(6)), batches=4)
        trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=1.0), F.mse_loss, [stream],
                             callbacks=[schedule, Recorder()], epochs=None, max_steps=10, device=device)  # fmt: skip
        trainer.fit()
        return seen, trainer

    taken, trainer = learning_rates(CosineWarmRestarts(1.0, min_value=0.01))
    assert len(taken) == trainer.total_steps == trainer.global_step == 10
    assert taken == learning_rates(CosineWarmRestarts(1.0, period=10, min_value=0.01))[0]
    assert taken[0] == 1.0 and taken[-1] == pytest.approx(0.01 + 0.99 / 2 * (math.cos(math.pi * 9 / 10) + 1))
    cycle, _ = learning_rates(OneCycle(1.0))
    assert cycle[-1] == pytest.approx(1.0 / 25.0 / 1e4)  # the floor, at the run's last step


def test_a_cosine_saves_only_the_period_it_took_from_the_run():
    given, taken = CosineWarmRestarts(1.0, period=20), CosineWarmRestarts(1.0)
    assert given.state_dict() == {} and taken.state_dict() == {}
    given.load_state_dict({"period": 10})
    taken.load_state_dict({"period": 10})
    assert (given.period, taken.period) == (20, 10)
