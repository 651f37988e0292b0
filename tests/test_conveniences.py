"""What Lightning users reach for: a phase's batch limit and the k best checkpoints, exact across a resume."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import statetrainer as st
from statetrainer import callbacks as cb
from statetrainer.checkpoint import read_tree
from statetrainer.testing import EventRecorder


def limited_trainer(device: torch.device, folder, recorder: EventRecorder | None = None) -> st.Trainer:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, generator=generator), torch.randn(64, 1, generator=generator))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    phases = [st.Phase("train", DataLoader(data, batch_size=8, shuffle=True), limit=3),
              st.Phase("valid", DataLoader(data, batch_size=16), grad=False, limit=2)]  # fmt: skip
    callbacks = [cb.SmoothedLoss(), cb.Checkpoint(folder, every_steps=2)] + ([recorder] if recorder else [])
    return st.Trainer(model, torch.optim.Adam(model.parameters(), lr=0.01), F.mse_loss, phases, callbacks=callbacks,
                      epochs=3, device=device, seed=1)  # fmt: skip


def test_a_phase_limit_caps_its_batches_and_a_resume_inside_it_is_exact(device, tmp_path):
    recorder = EventRecorder()
    whole = limited_trainer(device, tmp_path / "whole", recorder).fit()
    batches = [(event.epoch, event.phase, event.batch_index) for event in recorder.events if event.hook == "exit batch"]
    assert batches == [(epoch, phase, index) for epoch in range(3) for phase, count in (("train", 3), ("valid", 2))
                       for index in range(count)]  # fmt: skip
    stopped = limited_trainer(device, tmp_path / "run")
    stopped.run_until("phase", epoch=1, phase="train", batch=1)  # back between batches after batch 1
    path = stopped.save_checkpoint(tmp_path / "mid.safetensors")
    resumed = limited_trainer(device, tmp_path / "run")
    resumed.load_checkpoint(path)
    resumed.fit()
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert resumed.metrics == whole.metrics and resumed.global_step == whole.global_step == 9


def best_trainer(device: torch.device, folder) -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    generator = torch.Generator().manual_seed(2)
    train = [(torch.randn(4, 3, generator=generator), torch.randn(4, 1, generator=generator)) for _ in range(3)]
    valid = [(torch.randn(4, 3, generator=generator), torch.randn(4, 1, generator=generator)) for _ in range(2)]
    checkpoint = cb.Checkpoint(folder, every_epochs=1, keep_last=1, best="valid_loss", keep_best=2)
    return st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9), F.mse_loss,
                      [st.Phase("train", train), st.Phase("valid", valid, grad=False)],
                      callbacks=[cb.SmoothedLoss(), cb.CSVLogger(folder / "log.csv"), checkpoint], epochs=6,
                      device=device)  # fmt: skip


def kept(folder) -> list[str]:
    return sorted(path.name for path in folder.glob("best-epoch*.safetensors"))


def test_keep_best_keeps_the_k_best_epochs_and_resumes_to_the_same_files(device, tmp_path):
    whole = best_trainer(device, tmp_path / "whole")
    whole.fit()
    losses = [float(row.split(",")[3]) for row in (tmp_path / "whole" / "log.csv").read_text().splitlines()[1:]]
    best_two = sorted(range(len(losses)), key=losses.__getitem__)[:2]
    assert kept(tmp_path / "whole") == sorted(f"best-epoch{epoch + 1:04d}.safetensors" for epoch in best_two)
    run = tmp_path / "run"
    killed = best_trainer(device, run)
    killed.run_until("epoch", epoch=4)  # four epochs done and saved; then the process dies
    resumed = best_trainer(device, run)
    resumed.load_checkpoint(run)
    resumed.fit()
    assert kept(run) == kept(tmp_path / "whole")
    assert resumed.callbacks[2].ranked == whole.callbacks[2].ranked
    for name in kept(run):  # the same checkpoints (the run ids in them differ)
        ours, theirs = read_tree(run / name)["step"]["model"], read_tree(tmp_path / "whole" / name)["step"]["model"]
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
