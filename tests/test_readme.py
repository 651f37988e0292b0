"""The README's step-based recipe runs as written (its step counts made small), and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import statetrainer as st

README = Path(__file__).parents[1] / "README.md"


def recipe() -> str:
    """The code block of the README's "Runs counted in steps" section."""
    section = README.read_text().split("## Runs counted in steps", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found is not None, "the section has no python block"
    return found.group(1)


def test_the_step_recipe_in_the_readme_runs_and_stops_at_max_steps(tmp_path, monkeypatch, device):
    code = recipe()
    assert len(code.splitlines()) <= 15
    small = code.replace("batches=2000", "batches=4").replace("max_steps=50_000", "max_steps=10")
    small = small.replace("every_steps=500", "every_steps=3")
    assert small.count("=4") and "max_steps=10" in small, "the recipe's numbers moved: update this test"
    monkeypatch.chdir(tmp_path)
    st.seed_everything(0)
    inputs = torch.randn(96, 6)
    labels = inputs[:, :3].argmax(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).to(device)
    names = {
        "torch": torch, "st": st, "model": model, "optimizer": torch.optim.Adam(model.parameters(), lr=1e-3),
        "stream": DataLoader(TensorDataset(inputs[:64], labels[:64]), batch_size=8, shuffle=True),
        "valid": DataLoader(TensorDataset(inputs[64:80], labels[64:80]), batch_size=8),
        "test": DataLoader(TensorDataset(inputs[80:], labels[80:]), batch_size=8),
    }  # fmt: skip
    exec(small.replace("seed=0,", f"seed=0, device={str(device)!r},"), names)  # noqa: S102 -- the README's code
    trainer = names["trainer"]
    assert trainer.global_step == trainer.total_steps == 10 and trainer.finished
    assert trainer.epoch == 2  # 4 steps an epoch: the third ends at step 10
    assert set(names["metrics"]) == {"valid_loss"} and names["metrics"] == {"valid_loss": trainer.metrics["valid_loss"]}
    assert [len(batch) for batch in names["outputs"]] == [8, 8]
    # every_steps=3: the newest three are step 9's and the ends of epochs 2 and 3 (steps 8 and 10).
    files = (tmp_path / "checkpoints" / "steps").glob("ckpt-*.safetensors")
    assert sorted(int(re.search(r"step(\d+)", path.name)[1]) for path in files) == [8, 9, 10]
