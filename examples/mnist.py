"""Train a shallow CNN on MNIST with statetrainer, resuming where it stopped.

    uv run python examples/mnist.py                   # MNIST from --data-root, downloaded when possible
    uv run python examples/mnist.py --epochs 1 --offline

Adam with the one-cycle schedule (and inverse momentum cycling), light random
affine augmentation, a bias-corrected smoothed loss and an accuracy per phase,
one log line per epoch, a CSV log, a progress bar on a terminal, PNG plots of
the metrics and the learning-rate schedule, and checkpoints, all in ``--out``.

Checkpoints are taken every 100 steps and every epoch. Run the same command
again after an interruption (Ctrl-C, a crash, ``kill -9``) and it continues
from the newest one, ending exactly where the uninterrupted run would have;
``--fresh`` starts over instead, moving the earlier run's files into
``--out``/earlier-runs/<date>-<run>/ first. Run again after the run has finished, it
says so, shows the last epoch's line and trains nothing; with a larger
``--epochs`` it trains on to that many epochs (the one-cycle schedule keeps
the length it began with, so the extra epochs run at its final learning rate).

Data comes from ``--data-root``: a folder holding MNIST's original ``.gz``
files (``train-*`` and ``t10k-*``; with the test set alone it is split
8,000/2,000 into train and valid), or torchvision's ``MNIST`` folder there,
downloaded when possible. When there is none of those, the example trains on
digits it renders itself with Pillow instead, and says in one line which files
it looked for: it never fails for being offline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-root",
        type=Path,
        default=Path("data"),
        help="MNIST's original .gz files (train and/or t10k), or torchvision's MNIST folder",
    )
    parser.add_argument("--offline", action="store_true", help="do not try to download MNIST")
    parser.add_argument(
        "--epochs", type=int, default=3, help="epochs of the run (more than a finished run's: train on)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--lr", type=float, default=5e-3, help="the one-cycle's peak learning rate (Adam)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1...; default: CUDA when available")
    parser.add_argument("--seed", type=int, default=0, help="decides the data order, augmentation and weights")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many samples of each set")
    parser.add_argument("--out", type=Path, default=Path("checkpoints/mnist"), help="checkpoints, logs, plots")
    parser.add_argument(
        "--progress", action="store_true", help="draw the progress bar even when stderr is not a terminal (under | tee)"
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start over instead of resuming (the earlier run moves to --out/earlier-runs/)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args(sys.argv[1:])  # --help answers here, before torch and torchvision load (seconds)

import torch  # noqa: E402 -- after the arguments, on purpose
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms import v2 as transforms
from torchvision.transforms.v2 import functional as TF

import statetrainer as st
from statetrainer import callbacks as cb
from statetrainer.checkpoint import set_aside

MEAN, STD = 0.1307, 0.3081


def shallow_cnn() -> nn.Module:
    """Two conv blocks and two linear layers: about 100k parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


def train_transform() -> transforms.Transform:
    """Light augmentation: small random shifts, rotations and zooms."""
    return transforms.Compose([
        transforms.ToImage(),
        transforms.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
        transforms.ToDtype(torch.float32, scale=True),
        transforms.Normalize([MEAN], [STD]),
    ])  # fmt: skip


def eval_transform() -> transforms.Transform:
    return transforms.Compose(
        [transforms.ToImage(), transforms.ToDtype(torch.float32, scale=True), transforms.Normalize([MEAN], [STD])]
    )


class ImageTensors(Dataset):
    """Images held as a uint8 tensor (N x 28 x 28) with their labels, passed through ``transform``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: transforms.Transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index].unsqueeze(0)), int(self.labels[index])


def holdout_split(
    images: torch.Tensor, labels: torch.Tensor, valid_size: int = 2000, seed: int = 0
) -> tuple[ImageTensors, ImageTensors]:
    """A seeded train/valid split of uint8 images, augmented for training."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train, valid = order[:-valid_size], order[-valid_size:]
    return (ImageTensors(images[train], labels[train], train_transform()),
            ImageTensors(images[valid], labels[valid], eval_transform()))  # fmt: skip


class RenderedDigits(Dataset):
    """Digits drawn with Pillow's default font, each one shifted, rotated and thickened its own way.

    Item ``i`` is always the same image (it is drawn from a generator seeded by
    ``seed`` and ``i``), so the set is fixed like a real dataset; ``transform``
    then adds the usual random augmentation.
    """

    def __init__(self, size: int, seed: int, transform: transforms.Transform | None = None) -> None:
        self.size, self.seed, self.transform = size, seed, transform

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        uniform = lambda low, high: low + (high - low) * torch.rand((), generator=generator).item()  # noqa: E731
        label = int(torch.randint(10, (), generator=generator))
        font = ImageFont.load_default(size=round(uniform(18, 26)))
        image = Image.new("L", (28, 28))
        ImageDraw.Draw(image).text((14, 14), str(label), fill=255, font=font, anchor="mm",
                                   stroke_width=round(uniform(0, 1.6)), stroke_fill=255)  # fmt: skip
        image = TF.affine(image, angle=uniform(-15, 15), translate=[round(uniform(-3, 3)), round(uniform(-3, 3))],
                          scale=uniform(0.8, 1.1), shear=[uniform(-12, 12)])  # fmt: skip
        return (self.transform(image) if self.transform else image), label


MNIST_GZ = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_gz_pair(folder: Path, names: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8, N x 28 x 28) and labels from MNIST's original ``.gz`` files."""
    import gzip
    import tempfile

    from torchvision.datasets.mnist import read_image_file, read_label_file

    with tempfile.TemporaryDirectory() as unpacked:  # torchvision reads the unpacked files
        paths = []
        for name in names:
            path = Path(unpacked) / name.removesuffix(".gz")
            with gzip.open(folder / name, "rb") as packed:
                path.write_bytes(packed.read())
            paths.append(path)
        return read_image_file(str(paths[0])), read_label_file(str(paths[1]))


def load_data(root: Path, download: bool, seed: int) -> tuple[Dataset, Dataset, str]:
    """MNIST from its original ``.gz`` files in ``root``, or torchvision's MNIST there, or rendered digits."""
    present = {split: all((root / name).is_file() for name in names) for split, names in MNIST_GZ.items()}
    if present["train"]:
        train_images, train_labels = read_gz_pair(root, MNIST_GZ["train"])
        train = ImageTensors(train_images, train_labels, train_transform())
        if present["test"]:
            test_images, test_labels = read_gz_pair(root, MNIST_GZ["test"])
            return (
                train,
                ImageTensors(test_images, test_labels, eval_transform()),
                f"MNIST from the .gz files in {root}",
            )
        train, valid = holdout_split(train_images, train_labels, seed=seed)
        return train, valid, f"MNIST's training set from {root}, split {len(train)}/{len(valid)} into train/valid"
    if present["test"]:
        train, valid = holdout_split(*read_gz_pair(root, MNIST_GZ["test"]), seed=seed)
        return train, valid, (f"MNIST's test set alone from {root} ({len(train) + len(valid)} images), split "
                              f"{len(train)}/{len(valid)} into train/valid")  # fmt: skip
    try:
        train = datasets.MNIST(root, train=True, download=download, transform=train_transform())
        valid = datasets.MNIST(root, train=False, download=download, transform=eval_transform())
        return train, valid, f"MNIST from {root}"
    except (RuntimeError, OSError) as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        reason = "downloads are off (--offline)" if not download else lines[-1] if lines else type(error).__name__
    train = RenderedDigits(12_000, seed=seed, transform=train_transform())
    valid = RenderedDigits(2_000, seed=seed + 1, transform=eval_transform())
    looked_for = ", ".join(name for names in MNIST_GZ.values() for name in names)
    return train, valid, (f"offline: MNIST is not in {root} (neither {looked_for} nor torchvision's MNIST/ folder) and "
                          f"could not be downloaded: {reason}; using digits rendered with Pillow")  # fmt: skip


def build_trainer(
    train: Dataset, valid: Dataset, *, epochs: int = 3, batch_size: int = 64, lr: float = 5e-3,
    device: str | None = None, workers: int = 2, out: Path = Path("checkpoints/mnist"), progress: bool = True,
    seed: int = 0, force_progress: bool = False,
) -> st.Trainer:  # fmt: skip
    """The recipe: shallow CNN, Adam + one-cycle, smoothed loss, accuracy, logs, plots, checkpoints."""
    loader_options = {"num_workers": workers, "persistent_workers": workers > 0}
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, **loader_options)
    valid_loader = DataLoader(valid, batch_size=512, **loader_options)
    model = shallow_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    callbacks: list[st.Callback] = [
        cb.OneCycle(lr, cycle_momentum=True),  # over the run's total_steps, on any number of processes
        cb.SmoothedLoss(),
        cb.Accuracy(),
        cb.StreamLogger(),
        cb.CSVLogger(out / "log.csv"),
        cb.Plots(out),
        cb.Checkpoint(out, every_steps=100, every_epochs=1, keep_last=2, best="valid_accuracy"),
    ]
    if progress:
        callbacks.append(cb.ProgressBar(force=force_progress))
    return st.Trainer(
        model, optimizer, F.cross_entropy,
        phases=[st.Phase("train", train_loader), st.Phase("valid", valid_loader, grad=False)],
        callbacks=callbacks, epochs=epochs, device=device, seed=seed,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> st.Trainer:
    args = parse_args(argv)
    st.seed_everything(args.seed)  # weights and dropout; the trainer's seed decides data order and augmentation
    train, valid, source = load_data(args.data_root, download=not args.offline, seed=args.seed)
    print(source, flush=True)
    if args.limit is not None:
        train, valid = (torch.utils.data.Subset(data, range(min(args.limit, len(data)))) for data in (train, valid))
    trainer = build_trainer(train, valid, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            device=args.device, workers=args.workers, out=args.out, seed=args.seed,
                            force_progress=args.progress)  # fmt: skip
    if args.fresh:  # the folder's old run moves aside, so the new one neither mixes with it nor is refused by it
        moved = set_aside(args.out)
        if moved is not None:
            print(f"starting afresh: the earlier run in {args.out}/ is now in {moved}/", flush=True)
    try:
        resumed = None if args.fresh else trainer.load_checkpoint(args.out)
    except st.CheckpointError as error:
        raise SystemExit(f"cannot resume from {args.out}: {error}") from None
    if resumed is not None and trainer.finished:
        print(f"the run in {args.out}/ has already finished ({trainer.position.end_reason()}); its last epoch:")
        print(cb.StreamLogger.format(trainer.position.epochs_done, trainer.metrics))
        print(f"checkpoints, log and plots in {args.out}/ (--epochs N trains on to N epochs, --fresh starts over)")
        return trainer
    if resumed is not None:
        print(f"resumed from {resumed} (epoch {trainer.epoch + 1}, step {trainer.global_step})", flush=True)
        schedule = trainer.callbacks[0]
        if schedule.total_steps != trainer.total_steps:
            print(f"training on to {args.epochs} epochs: the one-cycle schedule keeps its length of "
                  f"{schedule.total_steps} steps, so steps after it run at its final learning rate", flush=True)  # fmt: skip
    else:
        found = st.summary(trainer)  # on every rank: it takes the run's state, which gathers the ranks' generators
        if trainer.ranks.is_global_zero:
            print(found, flush=True)  # once, as the run starts
    trainer.fit()
    print(f"checkpoints, log and plots in {args.out}/")
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
