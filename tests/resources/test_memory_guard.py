"""The memory guard (resources.memory): a step's budget, shrinking batches, the machine's reserve,
and what the guard does to memory before it reads the RSS (collections, malloc_trim, the pinned
mmap threshold)."""

from __future__ import annotations

import contextlib
import gc
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Iterator

import pytest

from resources.memory import FROZEN_ENV, HEAP_TRIM, MemoryGuard, MemoryLimitExceeded
from tests.support import slow_patches
from tests.support.stockrx import (
    PRICE_JOB,
    digest,
    failure_description,
    hand_built,
    latest_execution,
    run_patch,
    seeded,
    starved_defs,
)

PCT8 = {"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": False}
DEFS = slow_patches.defs


@pytest.fixture
def memory_hog(monkeypatch):  # type: ignore[no-untyped-def]
    """The hog patch; what it holds is released when the test ends."""
    hog = slow_patches.MemoryHogPatch
    monkeypatch.setattr(hog, "held", [])
    yield hog
    hog.held.clear()


def test_a_step_over_its_memory_limit_fails_clearly_before_any_write(database_url, memory_hog):
    engine = seeded(database_url, items=600)
    before = digest(engine)
    memory_hog.hog_mb = 300
    result = run_patch(
        database_url, "memory_hog_patch", {**PCT8, "memory_limit_mb": 200, "batch_size": 200},
        defs=DEFS, approve=False,
    )
    assert not result.success
    desc = failure_description(result)
    assert "memory limit exceeded before batch 2" in desc and "limit 200 MB" in desc, desc
    assert "Raise memory_limit_mb or lower batch_size" in desc
    assert digest(engine) == before
    ex = latest_execution(engine)
    assert ex["status"] == "failed" and ex["batches_done"] == 1
    assert ex["peak_rss_mb"] > 0


def test_memory_near_the_limit_shrinks_batches_then_fails_clearly(database_url, memory_hog):
    engine = seeded(database_url, items=3000)
    before = digest(engine)
    # 170 MB held: above the soft threshold (80 % of 200) but below the limit, so the guard
    # halves the batch, halves again, ... and gives up after three batches at the minimum.
    memory_hog.hog_mb = 170
    result = run_patch(
        database_url, "memory_hog_patch", {**PCT8, "memory_limit_mb": 200, "batch_size": 800},
        defs=DEFS, approve=False,
    )
    assert not result.success
    desc = failure_description(result)
    assert "minimum batch size 100" in desc and "limit 200 MB" in desc, desc
    assert digest(engine) == before
    ex = latest_execution(engine)
    # 800, then 400 → 200 → 100, then three strikes at 100 rows
    assert ex["batches_done"] == 6
    assert ex["processed_records"] == 800 + 400 + 200 + 3 * 100


def test_a_machine_short_of_memory_stops_the_step_whatever_its_budget(sqlite_url):
    engine = hand_built(sqlite_url, [100, 200])
    before = digest(engine)
    assert run_patch(sqlite_url, PRICE_JOB, {**PCT8, "dry_run": True}).success  # approves it
    result = run_patch(sqlite_url, PRICE_JOB, PCT8, defs=starved_defs(), approve=False)
    assert not result.success
    desc = failure_description(result)
    assert "machine memory nearly exhausted before batch 1" in desc, desc
    assert digest(engine) == before


def test_the_memory_budget_does_not_charge_the_step_for_what_its_process_already_held():
    ballast = bytearray(b"\x01") * (64 * 1024 * 1024)  # the process was already 64 MB bigger
    budget = MemoryGuard().budget(limit_mb=32, batch_size=500)
    assert budget.next_batch_size(1) == 500
    grown = bytearray(b"\x01") * (40 * 1024 * 1024)  # the step itself now holds 40 MB
    with pytest.raises(MemoryLimitExceeded, match="memory limit exceeded before batch 2"):
        budget.next_batch_size(2)
    assert budget.peak_used_mb >= 39 and budget.peak_rss_mb >= budget.baseline_rss_mb + 39
    del ballast, grown


def test_the_guard_does_not_count_freed_heap_as_the_steps_memory():
    # 250 MB of 64 KB blocks (glibc's heap, not mmap) freed between 1 KB blocks still in use:
    # the freed pages stay in the process's RSS until they are handed back to the system.
    budget = MemoryGuard().budget(limit_mb=100, batch_size=500)
    kept, freed = [], []
    for _ in range(4000):
        freed.append(bytearray(64 * 1024))
        kept.append(bytearray(1024))
    del freed
    if not HEAP_TRIM:
        pytest.skip("no malloc_trim here (not glibc)")
    assert budget.next_batch_size(1) == 500  # not "memory limit exceeded" for freed memory
    assert budget.peak_used_mb < 50
    del kept


@contextlib.contextmanager
def _no_automatic_collections() -> Iterator[None]:
    """Only explicit gc.collect() calls free cycles meanwhile."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def test_the_guard_collects_batches_in_reference_cycles_before_it_reads():
    # A frame pandera validated points to its accessor and back: unreachable after the batch,
    # but freed only by a collection. With the interpreter's collections off, only the guard's
    # own collection can free this 40 MB before the reading.
    with _no_automatic_collections(), MemoryGuard().budget(limit_mb=32, batch_size=500) as budget:
        assert budget.next_batch_size(1) == 500
        batch: list[object] = [bytearray(b"\x01") * (40 * 1024 * 1024)]
        batch.append(batch)  # the cycle
        del batch
        assert budget.next_batch_size(2) == 500  # not "memory limit exceeded"
        assert budget.peak_used_mb < 32


class _Node:
    pass


def test_the_budget_freezes_what_the_step_began_with_and_only_what_it_froze(unfrozen):
    assert gc.get_freeze_count() == 0
    with _no_automatic_collections():
        old = _Node()
        old.self = old  # type: ignore[attr-defined]
        gone = weakref.ref(old)
        del old
        budget = MemoryGuard().budget(limit_mb=100, batch_size=500)
        assert gone() is None  # earlier garbage is collected, not frozen into the step
    with budget:
        assert gc.get_freeze_count() > 0  # not scanned by the collection before each batch
    assert gc.get_freeze_count() == 0  # given back to the collector after the step
    gc.freeze()  # someone else's freeze (a server pre-fork, say) is left as it was
    try:
        frozen = gc.get_freeze_count()
        with MemoryGuard().budget(limit_mb=100, batch_size=500):
            pass
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_a_process_forked_frozen_is_not_frozen_again_nor_counted(unfrozen, monkeypatch):
    """Forked from the op fork server (FROZEN_ENV set there, after its freeze), a budget asks
    nothing of the collector (counting the frozen objects walks them all) and freezes nothing."""
    monkeypatch.setenv(FROZEN_ENV, "1")
    with MemoryGuard().budget(limit_mb=100, batch_size=500):
        assert gc.get_freeze_count() == 0
    assert gc.get_freeze_count() == 0


_MMAPPED_AFTER_A_BIG_FREE = textwrap.dedent(
    """
    import ctypes, sys
    from resources.memory import MemoryGuard
    libc = ctypes.CDLL("libc.so.6")
    fields = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in fields.split()]
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    if sys.argv[1] == "guard":
        MemoryGuard().budget(limit_mb=100, batch_size=500)
    libc.free(libc.malloc(8 << 20))  # a mapped block freed: glibc's dynamic threshold -> 8 MB
    before = libc.mallinfo2().hblks
    block = libc.malloc(2 << 20)
    print(libc.mallinfo2().hblks - before)  # 1: the 2 MB block is its own mapping
    """
)


def test_the_guard_pins_glibcs_mmap_threshold(repo_root):
    # Unpinned, glibc serves big blocks (a batch's column arrays) from the heap once a bigger
    # mapped block was freed, and freeing them leaves holes in the heap instead of unmapping.
    def mapped(mode: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", _MMAPPED_AFTER_A_BIG_FREE, mode],
            cwd=str(repo_root), capture_output=True, text=True, check=False,
        )
        if "mallinfo2" in out.stderr or "libc.so.6" in out.stderr:
            pytest.skip("not glibc >= 2.33 (no mallinfo2 to count mapped blocks)")
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert mapped("plain") == "0"  # the control: glibc's dynamic threshold is at work
    assert mapped("guard") == "1"
