"""What a sharded checkpoint save costs each rank in memory, against a save that gathers the model on rank 0.

    torchrun --standalone --nproc_per_node=2 sharded_save_memory.py FOLDER [--width 1024 --blocks 4]

A model of ``--blocks`` square ``Linear(width, width)`` layers, sharded with
``shard_model`` and trained one step with Adam, is saved twice on every rank:
once as the trainer saves it (each rank writes its own pieces) and once the
way a gathering save would (torch's ``get_state_dict`` with
``full_state_dict=True`` to rank 0, then one file there). Around each save,
the process's peak resident memory is reset (``/proc/self/clear_refs``) and
read back (``VmHWM``; Linux), with glibc's malloc set to give every freed block
of 64 KiB or more back to the system at once, so that memory freed before a
save cannot hide what the save allocates; on CUDA the allocator's peak is read too. Each rank
writes ``FOLDER/memory-rank<R>.json``: the byte counts of its own shard, its
largest piece, the full state, and each save's peak above the memory it held
before.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import statetrainer as st
from statetrainer.distributed import shard_model


def return_freed_memory_at_once() -> None:
    """Have glibc's malloc map every block of 64 KiB or more on its own and unmap it when freed (a fixed threshold
    also ends its raising of the threshold as blocks are freed), so the resident size follows what is in use."""
    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold = -3
    if not libc.mallopt(m_mmap_threshold, 64 * 1024):
        raise OSError("mallopt(M_MMAP_THRESHOLD) failed")


def resident_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    assert match, field
    return int(match[1])


def peak_above_start(action: Callable[[], None], device: torch.device) -> dict[str, float]:
    """Run ``action``; its peak host memory (and CUDA memory) above what the process held when it began, in bytes,
    and its time."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident size starts again from the current size
    before = resident_kib("VmRSS")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    action()
    seconds = time.perf_counter() - started
    measured = {"host_peak": (resident_kib("VmHWM") - before) * 1024.0, "seconds": seconds}
    if device.type == "cuda":
        measured["cuda_peak"] = float(torch.cuda.max_memory_allocated(device) - allocated)
    return measured


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    options = parser.parse_args()
    folder = Path(options.folder)
    return_freed_memory_at_once()
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(options.width, options.width) for _ in range(options.blocks)))
    shard_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    samples = TensorDataset(torch.randn(16, options.width), torch.randn(16, options.width))
    trainer = st.Trainer(model, optimizer, F.mse_loss, [st.Phase("train", DataLoader(samples, batch_size=4))], epochs=1,
                         device=options.device, seed=0)  # fmt: skip
    trainer.fit()  # Adam's state exists from the first step on
    device = trainer.device

    tensors = [*model.parameters(), *(value for state in optimizer.state.values() for value in state.values()
                                      if torch.is_tensor(value) and value.dim())]  # fmt: skip
    own = sum(local_bytes(tensor) for tensor in tensors)
    full = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    largest = max(local_bytes(tensor) for tensor in tensors)

    sharded = peak_above_start(lambda: trainer.save_checkpoint(folder / "sharded.safetensors"), device)

    def gathered_save() -> None:
        weights, state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))  # fmt: skip
        if trainer.is_global_zero:
            flat = {f"model/{key}": value for key, value in weights.items()}
            for name, values in state["state"].items():
                flat.update({f"optimizer/{name}/{key}": value for key, value in values.items() if value.dim()})
            save_file(flat, str(folder / "gathered.safetensors"))

    gathered = peak_above_start(gathered_save, device)
    report = {"rank": int(os.environ.get("RANK", 0)), "world_size": trainer.world_size, "own_shard": own, "largest_piece": largest,
              "full_state": full, "sharded_save": sharded, "gathered_save": gathered}  # fmt: skip
    (folder / f"memory-rank{os.environ.get('RANK', 0)}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
