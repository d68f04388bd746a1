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
On CUDA the figure would be ``torch.cuda.max_memory_allocated`` (not wired: no GPU
here).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import time

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
    """Peak resident memory added by a block of code (Linux /proc; CPU runs).

    ``added_bytes``: VmHWM at the end minus VmRSS at the start, with the high-water
    mark reset on entry. Where /proc is unavailable it falls back to the process's
    lifetime ``ru_maxrss`` (an over-estimate) and says so in ``exact``.
    """

    def __enter__(self) -> "PeakMemory":
        gc.collect()  # garbage held only by reference cycles is freed now, not mid-training
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
        peak = status_bytes("VmHWM") if self.exact else None
        if peak is None:
            import resource  # Unix only: the fallback where /proc is missing

            self.exact = False
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_rss = peak
        self.added_bytes = max(0, peak - self.start_rss)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
