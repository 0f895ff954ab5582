"""What happens when things go wrong: every failure leaves live tables as they were."""

from __future__ import annotations

import contextlib
import gc
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import insert, select, text, update
from sqlalchemy.exc import OperationalError

from patch_ops import engine as eng
from patch_ops import state
from patch_ops.engine import _lock_rows
from patch_ops.state import executions, rejects
from resources.memory import HEAP_TRIM, MemoryGuard, MemoryLimitExceeded
from stockrx_patches.registry import RegistryError, default_registry, load_project_config
from stockrx_patches.schema import inventories
from tests.support import test_patches
from tests.support.stockrx import (
    PRICE_JOB,
    digest,
    failure_description,
    hand_built,
    latest_execution,
    prices,
    run_patch,
    seeded,
    starved_defs,
)

PCT8 = {"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": False}
DEFS = test_patches.defs


def test_rows_that_break_the_schema_block_the_commit(database_url):
    engine = seeded(database_url, items=120)
    before = digest(engine)
    result = run_patch(database_url, "negative_price_patch", PCT8, defs=DEFS, approve=False)
    assert not result.success
    assert digest(engine) == before
    ex = latest_execution(engine)
    assert ex["status"] == "failed" and ex["phase"] == "rolled_back"
    assert "failed validation" in ex["error_message"]
    assert ex["failed_records"] > 0
    assert "failed validation" in failure_description(result)
    with engine.connect() as conn:
        rows = conn.execute(
            select(rejects).where(rejects.c.execution_id == ex["execution_id"])
        ).mappings().all()
    assert rows and {r["column_name"] for r in rows} == {"price"}
    assert all(r["source_id"] % 3 == 0 for r in rows)


def test_a_broken_invariant_blocks_the_commit_and_names_the_rows(database_url):
    engine = hand_built(database_url, [100, 200, 300])
    before = digest(engine)
    result = run_patch(database_url, "forgetful_counter_patch", PCT8, defs=DEFS, approve=False)
    assert not result.success
    assert digest(engine) == before
    ex = latest_execution(engine)
    broken = ex["report"]["validation"]["invariants"]
    assert [b["name"] for b in broken] == ["inventory_logs_count_incremented"]
    assert sorted(r["id"] for r in broken[0]["sample"]) == [1, 2, 3]
    assert "inventory_logs_count_incremented" in ex["error_message"]


def test_post_verification_failure_restores_the_backup(database_url):
    engine = seeded(database_url, items=150)
    before = digest(engine)
    result = run_patch(database_url, "fails_after_commit_patch", PCT8, defs=DEFS, approve=False)
    assert not result.success
    assert "verification failed, restored from backup" in failure_description(result)
    assert digest(engine) == before
    ex = latest_execution(engine)
    assert ex["status"] == "failed" and ex["rollback_performed"]
    assert "checked_after_commit" in ex["error_message"]


def test_a_row_changed_by_the_app_after_backup_stops_the_commit(database_url):
    engine = hand_built(database_url, [100, 200, 300])
    old_prices = prices(engine)
    result = run_patch(database_url, "concurrent_app_patch", PCT8, defs=DEFS, approve=False)
    assert not result.success
    desc = failure_description(result)
    assert "application changed rows after the backup" in desc and "[2]" in desc
    assert prices(engine) == old_prices  # nothing committed
    with engine.connect() as conn:
        name = conn.execute(select(inventories.c.name).where(inventories.c.id == 2)).scalar_one()
    assert name == "renamed by the app"  # and the app's update is not lost
    ex = latest_execution(engine)
    assert ex["status"] == "failed" and "inventories" in ex["error_message"]


@pytest.mark.postgres
def test_an_app_update_racing_the_commit_is_not_overwritten(pg_url):
    # The application updates item 2 in a transaction that is still open when the commit
    # starts: the commit waits for the row's lock, then finds the row no longer equal to its
    # backup, and commits nothing. A plain UPDATE from the stage would overwrite the change.
    engine = hand_built(pg_url, [100, 200, 300])
    registry = default_registry()
    patch, settings = registry.patches[PRICE_JOB], registry.settings(PRICE_JOB)
    config = patch.config_class(adjustment_type="percentage", adjustment_value=8, dry_run=False)
    execution_id = eng.plan_execution(engine, patch, settings, config)
    eng.take_backup(engine, execution_id)
    eng.run_transform(engine, patch, execution_id, MemoryGuard())
    assert eng.validate_execution(engine, patch, settings, execution_id)[0]
    old_prices = prices(engine)
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    with engine.connect() as app, ThreadPoolExecutor(max_workers=1) as pool:
        app_tx = app.begin()
        app.execute(update(inventories).where(inventories.c.id == 2).values(name="app's"))
        commit = pool.submit(eng.commit_execution, engine, PRICE_JOB, execution_id)
        deadline = time.monotonic() + 60
        with engine.connect() as watcher:
            while not watcher.execute(waiting).scalar_one():
                assert not commit.done(), commit.exception()
                assert time.monotonic() < deadline, "the commit never waited for the app's row"
                time.sleep(0.05)
        app_tx.commit()
        with pytest.raises(eng.CommitConflict, match=r"inventories: 1 row\(s\), ids \[2\]"):
            commit.result(timeout=60)
    assert prices(engine) == old_prices  # nothing committed
    with engine.connect() as conn:
        name = conn.execute(select(inventories.c.name).where(inventories.c.id == 2)).scalar_one()
        ex = eng.load_execution(conn, execution_id)
    assert name == "app's"  # the application's update is kept
    assert ex["phase"] == "validated"


@pytest.mark.postgres
def test_the_commit_locks_every_target_row_before_its_conflict_check(pg_url):
    # Locked rows cannot change between the conflict check and the UPDATE (commit and restore):
    # the application waits instead. Here the application gives up at once (NOWAIT).
    engine = hand_built(pg_url, [100, 200, 300])
    state.ensure_framework_tables(engine)
    with engine.begin() as conn:
        conn.execute(insert(state.targets), [
            {"execution_id": "e", "table_name": "inventories", "row_id": i} for i in (1, 3)
        ])
    tables = state.reflect_tables(engine, ["inventories"])

    def app_can_lock(item_id: int) -> bool:
        with engine.connect() as app, app.begin():
            try:
                app.execute(
                    select(inventories.c.id)
                    .where(inventories.c.id == item_id)
                    .with_for_update(nowait=True)
                )
            except OperationalError as exc:
                assert "could not obtain lock" in str(exc.orig)
                return False
            return True

    with engine.begin() as conn:
        _lock_rows(conn, tables, "e", {"updates": {"inventories": ["price"]}})
        assert [app_can_lock(i) for i in (1, 2, 3)] == [False, True, False]
    assert [app_can_lock(i) for i in (1, 2, 3)] == [True, True, True]  # released at the end


@pytest.mark.postgres
@pytest.mark.parametrize("after_commit", [False, True], ids=["before_commit", "after_commit"])
def test_an_invariant_query_past_its_timeout_is_a_failed_check(pg_url, after_commit, monkeypatch):
    engine = seeded(pg_url, items=50)
    before = digest(engine)
    monkeypatch.setattr(test_patches.SlowInvariantPatch, "after_commit", after_commit)
    result = run_patch(pg_url, "slow_invariant_patch", PCT8, defs=DEFS, approve=False)
    assert not result.success
    ex = latest_execution(engine)
    assert ex["status"] == "failed"
    assert ex["phase"] == ("restored" if after_commit else "rolled_back")
    when = " after commit" if after_commit else ""
    assert (
        f"invariant slow_check could not be checked{when}: its query ran longer than 0.5 s "
        "(query_timeout_seconds) and was cancelled" in ex["error_message"]
    )
    assert digest(engine) == before  # never committed, or restored from the backup


@pytest.fixture
def memory_hog(monkeypatch):  # type: ignore[no-untyped-def]
    """The hog patch; what it holds is released when the test ends."""
    hog = test_patches.MemoryHogPatch
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


def test_the_budget_freezes_what_the_step_began_with_and_only_what_it_froze():
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


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"adjustment_type": "percentage", "adjustment_value": 1500}, "in [-100, 1000]"),
        ({"adjustment_type": "multiply", "adjustment_value": 0}, "> 0"),
        ({"adjustment_type": "percentage", "adjustment_value": 5, "min_price": 10, "max_price": 1},
         "min_price is greater"),
        ({"adjustment_type": "percentage", "adjustment_value": 5,
          "before_date": "2026-01-01'; DROP TABLE inventories; --"}, "before_date must be a date"),
        ({"adjustment_type": "percentage", "adjustment_value": 5, "batch_size": 0},
         "batch_size must be positive"),
    ],
)
def test_bad_config_is_refused_before_any_write_and_recorded(sqlite_url, config, message):
    engine = hand_built(sqlite_url, [100, 200])
    before = digest(engine)
    result = run_patch(sqlite_url, PRICE_JOB, {**config, "dry_run": False})
    assert not result.success
    assert "refused before any write" in failure_description(result)
    assert message in failure_description(result)
    assert digest(engine) == before
    ex = latest_execution(engine)
    assert ex["status"] == "failed" and message in ex["error_message"]


@pytest.mark.parametrize(
    "config",
    [
        {"adjustment_type": "percentage; DROP TABLE inventories", "adjustment_value": 5},
        {"adjustment_type": "percentage", "adjustment_value": "8 OR 1=1"},
        {"adjustment_type": "percentage", "adjustment_value": 5, "surprise": 1},
        {"adjustment_value": 5},
    ],
)
def test_wrong_types_are_rejected_by_dagster_before_any_op(sqlite_url, config):
    from dagster import DagsterInvalidConfigError

    engine = hand_built(sqlite_url, [100])
    before = digest(engine)
    with pytest.raises(DagsterInvalidConfigError):
        run_patch(sqlite_url, PRICE_JOB, config)
    assert digest(engine) == before


def test_unreachable_database_gives_a_clear_error_without_the_password():
    url = "postgresql+psycopg://stockrx:s3cret-pw@127.0.0.1:1/nowhere"
    result = run_patch(url, PRICE_JOB, PCT8)
    assert not result.success
    desc = failure_description(result)
    assert "cannot connect to the StockRx database" in desc
    assert "s3cret-pw" not in desc
    for event in result.all_events:
        assert "s3cret-pw" not in str(event)


def test_missing_table_and_missing_column_are_refused(sqlite_url):
    from patch_ops.database import get_engine

    engine = get_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE inventories (id INTEGER PRIMARY KEY, name VARCHAR(255), price NUMERIC)"
        )
    result = run_patch(sqlite_url, PRICE_JOB, PCT8)
    assert not result.success
    assert "table(s) not found in the StockRx database: inventory_logs" in failure_description(result)

    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE inventory_logs (id INTEGER PRIMARY KEY, inventory_id INTEGER)"
        )
    result = run_patch(sqlite_url, PRICE_JOB, PCT8)
    assert not result.success
    desc = failure_description(result)
    assert "column(s) missing in table 'inventories'" in desc and "inventory_logs_count" in desc
    with engine.connect() as conn:
        statuses = conn.execute(select(executions.c.status)).scalars().all()
    assert statuses == ["failed", "failed"]


def test_checks_run_at_once_keep_their_order_and_raise_after_all_ended():
    # Both calls must be running at the same time to pass the barrier: one after the other,
    # the first would wait in vain (BrokenBarrierError).
    barrier = threading.Barrier(2, timeout=30)
    ended: list[str] = []

    def call(name: str, fail: bool = False) -> str:
        barrier.wait()
        time.sleep(0.05 if fail else 0.2)
        ended.append(name)
        if fail:
            raise ValueError(f"{name} failed")
        return name

    assert eng.run_concurrently([lambda: call("a"), lambda: call("b")], 2) == ["a", "b"]
    ended.clear()
    with pytest.raises(ValueError, match="b failed"):
        eng.run_concurrently([lambda: call("a"), lambda: call("b", fail=True)], 2)
    assert sorted(ended) == ["a", "b"]  # the failure waited for the other check to end
    assert eng.run_concurrently([lambda: "x", lambda: "y"], 1) == ["x", "y"]


def test_check_connections_come_from_the_yaml(tmp_path):
    path = tmp_path / "p.yml"
    entry = "patches:\n  p:\n    description: d\n    target_tables: [t]\n"
    path.write_text(entry)
    assert load_project_config(path).patches["p"].check_connections == 2
    path.write_text(entry + "    check_connections: 1\n")
    assert load_project_config(path).patches["p"].check_connections == 1
    for bad in ("0", "1.5", "'2'", "true"):
        path.write_text(entry + f"    check_connections: {bad}\n")
        with pytest.raises(RegistryError, match="check_connections must be a whole number"):
            load_project_config(path)
