"""A memory guard built on psutil: shrink the batch before the box runs out, then fail clearly.

Two readings are taken before every batch:

* **the step's own memory**: the resident set size (RSS) of the step's process *above what it held
  when the step began*. ``memory_limit_mb`` is a budget for this working memory, so it means the
  same thing whether the step runs in its own process (the multiprocess executor, ``dagster job
  execute``) or shares a long-lived one (``execute_in_process``, the UI's in-process executor):
  Dagster's own imports and whatever other runs left behind are not charged to the patch.
  Above ``soft_ratio`` of the budget the batch is halved; at the minimum batch size, a few
  batches in a row above it fail the step; above the budget the step fails at once.
* **the machine**: if the memory available to new allocations (``psutil.virtual_memory()``)
  drops below ``min_available_mb``, the step fails before the box starts swapping or the OOM
  killer picks a victim, whatever the step's own budget says.

Before each reading the guard collects cyclic garbage (``gc.collect``). A batch's frames end up
in reference cycles (pandera caches its accessor on every frame it validates, pandas its ``.str``
accessor on a Series, and the accessor points back), and Python frees a cycle only in a full
collection. With the ~210,000 objects Dagster keeps alive, the interpreter's own rule runs one
only every 30-50 batches, so the garbage of that many batches was held in between: the in-process
2M-item transform went 184 -> 212 MB and back in that sawtooth, and the 10M-item benchmark's
transform peaked at 265 MB against 211 MB at 100k (with the collection: 225 MB against
211 MB, benchmarks/README.md). A full collection costs ~200 ms with those
objects; so for the duration of a step (``with memory.budget(...)``) the objects alive when it
began are frozen (``gc.freeze``, not scanned again) and each collection scans only what the
batches made: ~5 ms (the 2M transform: 184-212 -> 177-183 MB, 63.2 -> 59.2 s). One full
collection when the budget is made keeps earlier garbage out of the baseline and the freeze.

Then the guard hands the C heap's free pages back to the system (glibc's
``malloc_trim``): pandas frees a batch's frames into the heap, where they stay counted in RSS
between the blocks that are still live. Without it the reading grows with the number of batches
(the 1M-item transform in-process: 176 → 207 MB over 50 batches; 245 MB at 1M and 282 MB at 10M
in the benchmark) although the memory in use does not.

It also pins glibc's mmap threshold at 128 KiB (``mallopt``; glibc otherwise raises it after
every large block freed, up to 32 MiB): a batch's column arrays are then their own mappings, given
back whole when freed, instead of heap blocks that leave holes (in-process 2M-item transform,
RSS while a batch is being staged: 195-203 MB with the dynamic threshold, 185-189 MB pinned;
same speed; 100k benchmark: largest process 221 -> 211 MB).

Failing here is always safe: the transform only writes staging tables, nothing is committed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
from dagster import ConfigurableResource
from pydantic import Field

MB = 1024 * 1024


class MemoryLimitExceeded(RuntimeError):
    """The step uses more memory than the patch is allowed; the run must stop."""


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


# Both are glibc's; elsewhere (macOS, musl) they are missing and the guard tunes nothing.
_LIBC = _libc()
_MALLOC_TRIM: Callable[[int], int] | None = getattr(_LIBC, "malloc_trim", None)
_MALLOPT: Callable[[int, int], int] | None = getattr(_LIBC, "mallopt", None)
HEAP_TRIM = _MALLOC_TRIM is not None  #: release_free_memory can trim the heap here
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's default starting value, kept fixed
#: Set ("1") by a process that froze its objects (the op fork server, patch_ops.forkserver_gc)
#: for the processes it forks: their budgets need not ask ``gc.get_freeze_count()``, which walks
#: every frozen object (the fork server's ~1M: 35-40 ms of each transform op).
FROZEN_ENV = "STOCKRX_GC_FROZEN"


def release_free_memory() -> None:
    """Free unreachable reference cycles (batches' frames among them), then return the heap's
    free pages to the system (glibc; no trim where there is no such call)."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def pin_mmap_threshold() -> None:
    """Fix glibc's mmap threshold (no dynamic raise): blocks from 128 KiB up are mapped and
    unmapped on their own. Process-wide and harmless to the rest of the process; nothing where
    there is no mallopt."""
    if _MALLOPT is not None:
        _MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def current_rss_mb() -> float:
    return psutil.Process().memory_info().rss / MB


def available_mb() -> float:
    return psutil.virtual_memory().available / MB


@dataclass
class MemoryBudget:
    """Per-step state of the guard: the budget, the current batch size, the strikes so far."""

    limit_mb: float
    batch_size: int
    soft_ratio: float
    min_batch_size: int
    max_soft_strikes: int
    min_available_mb: float
    baseline_rss_mb: float = field(default_factory=current_rss_mb)
    peak_rss_mb: float = 0.0
    peak_used_mb: float = 0.0
    shrinks: list[tuple[int, int, float]] = field(default_factory=list)
    _strikes: int = 0
    _froze: bool = False

    def __enter__(self) -> MemoryBudget:
        """Freeze the objects alive now (unless something else froze some): the collection
        before each batch then scans only the objects the step made since."""
        if os.environ.get(FROZEN_ENV) != "1" and gc.get_freeze_count() == 0:
            gc.freeze()
            self._froze = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._froze:
            gc.unfreeze()
            self._froze = False

    @property
    def soft_limit_mb(self) -> float:
        return self.limit_mb * self.soft_ratio

    def next_batch_size(self, batch_no: int) -> int:
        """Check memory before a batch; return the batch size to use, or raise."""
        release_free_memory()  # garbage and freed frames count as the step's memory otherwise
        rss = current_rss_mb()
        used = max(0.0, rss - self.baseline_rss_mb)
        self.peak_rss_mb = max(self.peak_rss_mb, rss)
        self.peak_used_mb = max(self.peak_used_mb, used)
        where = (
            f"step memory {used:.0f} MB (process RSS {rss:.0f} MB, "
            f"{self.baseline_rss_mb:.0f} MB when the step began)"
        )
        free = available_mb()
        if free < self.min_available_mb:
            raise MemoryLimitExceeded(
                f"machine memory nearly exhausted before batch {batch_no}: {free:.0f} MB "
                f"available < {self.min_available_mb:.0f} MB reserve; {where}; nothing was "
                "committed. Free memory on the machine or run the patch elsewhere."
            )
        if used > self.limit_mb:
            raise MemoryLimitExceeded(
                f"memory limit exceeded before batch {batch_no}: {where} > limit "
                f"{self.limit_mb:.0f} MB (batch size {self.batch_size}); nothing was committed. "
                "Raise memory_limit_mb or lower batch_size."
            )
        if used > self.soft_limit_mb:
            if self.batch_size > self.min_batch_size:
                new_size = max(self.min_batch_size, self.batch_size // 2)
                self.shrinks.append((batch_no, new_size, used))
                self.batch_size = new_size
            else:
                self._strikes += 1
                if self._strikes >= self.max_soft_strikes:
                    raise MemoryLimitExceeded(
                        f"memory stays above {self.soft_ratio:.0%} of the limit even at the "
                        f"minimum batch size {self.min_batch_size}: {where}, limit "
                        f"{self.limit_mb:.0f} MB, batch {batch_no}; nothing was committed."
                    )
        else:
            self._strikes = 0
        return self.batch_size


class MemoryGuard(ConfigurableResource):
    """Watches the memory of the step's process and of the machine (psutil) between batches."""

    soft_ratio: float = Field(
        default=0.8, description="Above this share of the limit, halve the batch size."
    )
    min_batch_size: int = Field(default=100, description="Never shrink batches below this.")
    max_soft_strikes: int = Field(
        default=3,
        description="Fail after this many consecutive batches above the soft threshold at "
        "the minimum batch size.",
    )
    min_available_mb: float = Field(
        default=256.0,
        description="Fail when the machine has less memory than this available, whatever the "
        "step's own budget.",
    )

    def budget(self, limit_mb: float, batch_size: int) -> MemoryBudget:
        """A fresh budget for one step; its baseline is the process RSS right now. Use it as a
        context manager around the step's batches (see ``MemoryBudget.__enter__``)."""
        pin_mmap_threshold()
        release_free_memory()  # earlier garbage: neither in the baseline nor frozen with it
        return MemoryBudget(
            limit_mb=limit_mb,
            batch_size=batch_size,
            soft_ratio=self.soft_ratio,
            min_batch_size=min(self.min_batch_size, batch_size),
            max_soft_strikes=self.max_soft_strikes,
            min_available_mb=self.min_available_mb,
        )
