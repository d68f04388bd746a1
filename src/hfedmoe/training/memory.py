"""Peak-memory measurement of local training (CPU: Linux /proc), and the allocator setting
that keeps those peaks stable.

Peak memory on CPU is the kernel's high-water mark of resident memory (``VmHWM``),
reset when a local round starts. A client's *training memory* is reported as

    weights + (VmHWM during local training - VmRSS just before it)

which is what :class:`hfedmoe.core.budget.MemoryModel` predicts: the model's
weights plus everything training adds (gradients, optimizer state, activations),
and nothing the process held for other reasons (libraries, message buffers). Freed
memory is trimmed back to the kernel before the baseline is read, so earlier
rounds' garbage does not hide this round's peak.

On CUDA the same formula reads the caching allocator's counters instead:
``torch.cuda.max_memory_allocated`` (reset when the round starts) minus
``memory_allocated`` at the start, plus the weights. Tensors are what a GPU budget
caps; the allocator's cached but free blocks are handed back
(``torch.cuda.empty_cache``) before and after a round. :func:`gpu_memory_cap` makes a
process honour a client's GPU budget on a card larger than the budget.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import time
from collections.abc import Iterator

import torch


def status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def release_free_memory() -> None:
    """Hand memory that is already freed back to the kernel (glibc ``malloc_trim``), so
    a baseline taken next is not inflated by earlier garbage. (Forcing every large
    block onto its own mmap would make RSS exact, but measured 1.7x slower steps.)
    A no-op where glibc is not the allocator."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def bound_allocator(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every allocation of ``threshold_bytes`` or more from its own mmap (glibc).

    Why: glibc raises its mmap threshold as large blocks are freed (up to 32 MB), so
    in a long-lived process -- a simulation worker serving client after client --
    tensors of 1-32 MB move onto the heap, which fragments and does not shrink. The
    same local round then peaks higher round after round, whatever its expert budget
    (measured, 4 clients x 3 rounds of the default run: 1516 -> 1853 MB for the same
    client; 7 of 12 client rounds over their memory budget). With a fixed threshold
    each such block is its own mapping, returned to the kernel when freed: the peaks
    stayed flat across rounds and ~30% lower (1093 -> 1119 MB), for ~30% longer local
    rounds (page faults on fresh mappings). So clients with a memory budget (and
    ``hfedmoe calibrate``, which measures for them) use it; others keep glibc's
    default. Process-wide and permanent; returns False where mallopt is unavailable.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False


def memtrace(point: str, **extra) -> None:
    """Diagnostics: append this process's memory counters (MB) to the jsonl file named by
    $HFEDMOE_MEMTRACE; a no-op when it is unset. The client app and the trainer call it
    at a round's entry, around the state conversion, at the baseline and after every
    step, which is how the memory of a long-lived simulation worker was traced (issue 5)."""
    path = os.environ.get("HFEDMOE_MEMTRACE")
    if not path:
        return
    row = {"pid": os.getpid(), "t": time.time(), "point": point, **extra}
    for field in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
        value = status_bytes(field)
        row[field] = None if value is None else round(value / 1e6, 1)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


class PeakMemory:
    """Peak memory added by a block of code on ``device``.

    CPU: ``added_bytes`` is VmHWM at the end minus VmRSS at the start (Linux /proc),
    with the high-water mark reset on entry. Where /proc is unavailable it falls back
    to the process's lifetime ``ru_maxrss`` (an over-estimate) and says so in ``exact``.
    CUDA: the allocator's ``max_memory_allocated`` (reset on entry) minus
    ``memory_allocated`` at the start; ``peak_rss`` then holds the device's peak.

    The CPU figure needs a clean baseline: garbage collected, and freed memory handed
    back to the kernel (otherwise the block reuses memory that RSS already counts, and
    its peak is not seen). That is what makes it costly: the block then faults every
    page it touches back in. Measured on the embedded model (benchmarks/inprocess_gap.py
    and docs in BENCHMARKS.md): ~1 GB of page faults and ~0.25 s of ``gc.collect`` per
    local round, 15-20% of a 2 s round. ``collect=False`` (CUDA only, where the
    allocator's own counters need no clean baseline) skips the collection.
    """

    def __init__(self, device: torch.device | str = "cpu", collect: bool = True):
        self.device = torch.device(device)
        self.collect = collect
        if not collect and self.device.type != "cuda":
            raise ValueError("PeakMemory on the CPU needs collect=True (a clean baseline; see the class docstring)")

    def __enter__(self) -> "PeakMemory":
        if self.collect:
            gc.collect()  # garbage held only by reference cycles is freed now, not mid-training
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            if self.collect:
                torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.exact = True
            self.start_rss = torch.cuda.memory_allocated(self.device)
            return self
        release_free_memory()
        self.exact = True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            self.exact = False
        self.start_rss = status_bytes("VmRSS") or 0
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_rss = torch.cuda.max_memory_allocated(self.device)
            self.added_bytes = max(0, self.peak_rss - self.start_rss)
            return
        peak = status_bytes("VmHWM") if self.exact else None
        if peak is None:
            import resource  # Unix only: the fallback where /proc is missing

            self.exact = False
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_rss = peak
        self.added_bytes = max(0, peak - self.start_rss)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def resident_bytes(device: torch.device | str = "cpu") -> int:
    """What the process holds now: RSS on the CPU, the allocator's tensors on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return status_bytes("VmRSS") or 0


def release_device_memory(device: torch.device | str = "cpu") -> None:
    """On CUDA, free what a finished (or failed) round left behind: tensors held only by
    reference cycles, then the allocator's cached blocks, so the next client (or another
    process sharing the card) gets them. A no-op on the CPU: the next round's
    :class:`PeakMemory` collects and trims anyway, and a ``gc.collect()`` costs ~0.23 s
    in a process that imported torch and transformers (measured here)."""
    device = torch.device(device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def gpu_memory_cap(device: torch.device, budget_bytes: int | None, weights_bytes: int) -> Iterator[int | None]:
    """Cap this process's CUDA allocations so a client trains within its GPU budget.

    One card can stand in for several smaller ones (heterogeneous clients emulated on
    one GPU): the allocator refuses to grow past ``budget`` plus what the process held
    for others (``memory_allocated`` now minus the client's own weights, e.g. the
    server's model in the in-process engine), raising ``torch.cuda.OutOfMemoryError``,
    which the client round reports as its failure. Yields the cap in bytes (None: no
    cap, on the CPU or without a budget); the previous limit is restored on exit.
    """
    if device.type != "cuda" or not budget_bytes:
        yield None
        return
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    others = max(0, torch.cuda.memory_allocated(device) - weights_bytes)
    cap = min(total, others + int(budget_bytes))
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    try:
        yield cap
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
