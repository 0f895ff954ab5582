"""An application stand-in: a writer updating random items at a fixed rate while a contender
runs, so the report can say what each step costs the live application (issue 22).

    python -m benchmarks.app_writer --database-url URL --items N --rate 20 --out samples.txt

One connection, one short transaction per write (``UPDATE inventories SET quantity = quantity
WHERE id = :id``, a random id): it takes the row's lock and waits for whoever holds it, as the
app's stock moves do, but writes the value the row already has, so the contenders' final data
stay comparable and the patch's conflict check finds nothing. Writes are scheduled at fixed
instants (``rate`` per second) and each latency is measured from its *scheduled* instant, so a
write delayed by an earlier one that waited counts its wait too (no coordinated omission). A
write that takes longer than ``WAIT_S`` counts as a lock wait.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: A write slower than this counts as a lock wait (an idle write takes 1-10 ms here).
WAIT_S = 0.1


@dataclass
class WriterSamples:
    """Each write's scheduled instant (epoch seconds) and latency from it, and the errors."""

    rate: float
    samples: list[tuple[float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def between(self, start: float, end: float) -> list[float]:
        """Latencies of the writes scheduled in [start, end)."""
        return [lat for at, lat in self.samples if start <= at < end]


def latency_stats(latencies: Sequence[float]) -> dict[str, float | int | None]:
    """writes, p50/p99/max latency (ms), lock waits (writes slower than WAIT_S)."""
    if not latencies:
        return {"writes": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "waits": 0}
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {"writes": len(ordered), "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "max_ms": 1000 * ordered[-1], "waits": sum(1 for v in ordered if v > WAIT_S)}


@contextlib.contextmanager
def app_writer(url: str | None, items: int, rate: float, workdir: Path,
               label: str) -> Iterator[WriterSamples | None]:
    """Run the writer against ``url`` for the duration of the block (no-op without a url or
    with rate 0); the yielded samples are filled in when the block ends."""
    if not url or rate <= 0:
        yield None
        return
    out = workdir / f"app_writer_{label.replace(' ', '_')}.txt"
    out.unlink(missing_ok=True)
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.app_writer", "--database-url", url,
         "--items", str(items), "--rate", str(rate), "--out", str(out)],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    result = WriterSamples(rate)
    try:
        deadline = time.monotonic() + 30
        while not out.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the writer's first write is done: it is connected
        yield result
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            _, err = child.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            _, err = child.communicate()
        if child.returncode not in (0, -signal.SIGTERM):
            result.errors.append(f"writer exited {child.returncode}: {err.strip()[-300:]}")
        for line in out.read_text().splitlines() if out.exists() else []:
            kind, *rest = line.split(" ", 2)
            if kind == "ok":
                result.samples.append((float(rest[0]), float(rest[1])))
            else:
                result.errors.append(" ".join(rest))


def run(url: str, items: int, rate: float, out: Path) -> int:
    """The writer's loop (child process): until SIGTERM."""
    from sqlalchemy import text

    from benchmarks.databases import baseline_engine

    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    engine = baseline_engine(url)
    stmt = text("UPDATE inventories SET quantity = quantity WHERE id = :id")
    rng = random.Random(os.getpid())
    interval = 1.0 / rate
    with engine.connect() as conn, open(out, "a", encoding="utf-8", buffering=1) as f:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA busy_timeout = 600000")
            conn.commit()
        due = time.time()
        while not stop:
            now = time.time()
            if now < due:
                time.sleep(due - now)
                continue
            try:
                with conn.begin():
                    conn.execute(stmt, {"id": rng.randint(1, items)})
                f.write(f"ok {due:.6f} {time.time() - due:.6f}\n")
            except Exception as exc:  # noqa: BLE001 - reported, the writer goes on
                f.write(f"err {due:.6f} {type(exc).__name__}: {str(exc).splitlines()[0][:200]}\n")
            due += interval
    engine.dispose()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.app_writer", description=__doc__)
    p.add_argument("--database-url", required=True)
    p.add_argument("--items", type=int, required=True, help="ids 1..N are updated at random")
    p.add_argument("--rate", type=float, default=20.0, help="writes per second")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    return run(args.database_url, args.items, args.rate, args.out)


if __name__ == "__main__":
    sys.exit(main())
