"""Real data: a small CNN trained by statetrainer on the real MNIST test set (skipped when absent)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import statetrainer as st


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


class HoldOutAccuracy(st.Callback):
    """Counts correct predictions of the valid phase, for the test's own check."""

    def on_enter_phase(self, trainer):
        self.correct, self.seen = 0, 0

    def on_exit_batch(self, trainer):
        if not trainer.phase.grad:
            self.correct += int((trainer.output.argmax(1) == trainer.target).sum())
            self.seen += len(trainer.target)


def test_small_cnn_reaches_95_percent_on_a_real_mnist_hold_out(
    device: torch.device, mnist_test_set: tuple[torch.Tensor, torch.Tensor]
):
    images, labels = mnist_test_set
    inputs = (images.float().unsqueeze(1) / 255 - 0.1307) / 0.3081
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, valid = order[:8000], order[8000:]
    torch.manual_seed(0)
    train_loader = DataLoader(TensorDataset(inputs[train], labels[train]), batch_size=64, shuffle=True)
    valid_loader = DataLoader(TensorDataset(inputs[valid], labels[valid]), batch_size=500)
    model = small_cnn()
    accuracy = HoldOutAccuracy()
    trainer = st.Trainer(model, torch.optim.Adam(model.parameters(), lr=2e-3), F.cross_entropy,
                         [st.Phase("train", train_loader), st.Phase("valid", valid_loader, grad=False)],
                         callbacks=[accuracy], epochs=2, device=device)  # fmt: skip
    trainer.fit()

    assert accuracy.seen == 2000
    assert accuracy.correct / accuracy.seen >= 0.95, f"hold-out accuracy {accuracy.correct / accuracy.seen:.4f}"
    model.eval()
    with torch.no_grad():  # in the valid loader's batches, so the device computes the same logits as in the run
        independent = sum(int((model(x.to(device)).argmax(1).cpu() == y).sum()) for x, y in valid_loader)
    assert independent == accuracy.correct
