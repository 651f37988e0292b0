"""The example's recipe on real MNIST digits: valid accuracy and time after 3 epochs on the CPU.

Uses the 10,000-image MNIST test set in ``../shared/data/mnist`` (or the folder
in ``STATETRAINER_MNIST``), split 8,000 train / 2,000 valid with seed 0, as
``tests/test_example.py`` does.

    uv run python benchmarks/mnist_real.py
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.datasets.mnist import read_image_file, read_label_file

ROOT = Path(__file__).resolve().parents[1]
MNIST = Path(os.environ.get("STATETRAINER_MNIST", ROOT.parent / "shared/data/mnist"))


def main() -> None:
    names = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    if not all((MNIST / f"{name}.gz").is_file() for name in names):
        sys.exit(f"the real MNIST test set is not at {MNIST}")
    spec = importlib.util.spec_from_file_location("mnist_example", ROOT / "examples" / "mnist.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            with gzip.open(MNIST / f"{name}.gz", "rb") as source, open(Path(folder) / name, "wb") as target:
                shutil.copyfileobj(source, target)
        images = read_image_file(str(Path(folder) / names[0]))
        labels = read_label_file(str(Path(folder) / names[1]))
        train, valid = example.holdout_split(images, labels)  # 8,000 / 2,000
        torch.manual_seed(0)
        trainer = example.build_trainer(train, valid, epochs=3, device="cpu", out=Path(folder) / "out", progress=False)
        start = time.perf_counter()
        trainer.fit()
        print(f"valid_accuracy={trainer.metrics['valid_accuracy']:.4f} after 3 epochs in "
              f"{time.perf_counter() - start:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
