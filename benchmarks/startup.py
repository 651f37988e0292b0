"""How long a start takes: importing statetrainer over torch, and the example's ``--help``.

Each figure is the median wall time of ``--repeats`` fresh interpreters:

    uv run python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mnist.py"


def seconds(command: list[str], repeats: int) -> float:
    """The median wall time of running ``command`` ``repeats`` times."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh interpreters per figure")
    repeats = parser.parse_args().repeats
    bare = seconds([sys.executable, "-c", "pass"], repeats)
    torch_only = seconds([sys.executable, "-c", "import torch"], repeats)
    with_library = seconds([sys.executable, "-c", "import torch, statetrainer"], repeats)
    help_time = seconds([sys.executable, str(EXAMPLE), "--help"], repeats)
    print(f"median of {repeats} fresh interpreters each:")
    print(f"  python alone                    {bare:6.2f} s")
    print(f"  import torch                    {torch_only:6.2f} s")
    print(
        f"  import torch, statetrainer      {with_library:6.2f} s   (statetrainer's own: {with_library - torch_only:+.2f} s)"
    )
    print(f"  python examples/mnist.py --help {help_time:6.2f} s")


if __name__ == "__main__":
    main()
