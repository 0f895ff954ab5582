"""A memory guard built on psutil: shrink the batch before the box runs out, then fail clearly."""

from __future__ import annotations

from dataclasses import dataclass, field

import psutil
from dagster import ConfigurableResource
from pydantic import Field


class MemoryLimitExceeded(RuntimeError):
    """The process uses more memory than the patch is allowed; the run must stop."""


def current_rss_mb() -> float:
    return psutil.Process().memory_info().rss / (1024 * 1024)


@dataclass
class MemoryBudget:
    """Per-run state of the guard: the limit, the current batch size, the strikes so far."""

    limit_mb: float
    batch_size: int
    soft_ratio: float
    min_batch_size: int
    max_soft_strikes: int
    peak_rss_mb: float = 0.0
    shrinks: list[tuple[int, int, float]] = field(default_factory=list)
    _strikes: int = 0

    @property
    def soft_limit_mb(self) -> float:
        return self.limit_mb * self.soft_ratio

    def next_batch_size(self, batch_no: int) -> int:
        """Check RSS before a batch; return the batch size to use, or raise MemoryLimitExceeded."""
        rss = current_rss_mb()
        self.peak_rss_mb = max(self.peak_rss_mb, rss)
        if rss > self.limit_mb:
            raise MemoryLimitExceeded(
                f"memory limit exceeded before batch {batch_no}: RSS {rss:.0f} MB > limit "
                f"{self.limit_mb:.0f} MB (batch size {self.batch_size}); nothing was committed. "
                "Raise memory_limit_mb or lower batch_size."
            )
        if rss > self.soft_limit_mb:
            if self.batch_size > self.min_batch_size:
                new_size = max(self.min_batch_size, self.batch_size // 2)
                self.shrinks.append((batch_no, new_size, rss))
                self.batch_size = new_size
            else:
                self._strikes += 1
                if self._strikes >= self.max_soft_strikes:
                    raise MemoryLimitExceeded(
                        f"memory stays above {self.soft_ratio:.0%} of the limit even at the "
                        f"minimum batch size {self.min_batch_size}: RSS {rss:.0f} MB, limit "
                        f"{self.limit_mb:.0f} MB, batch {batch_no}; nothing was committed."
                    )
        else:
            self._strikes = 0
        return self.batch_size


class MemoryGuard(ConfigurableResource):
    """Watches the resident memory of the step's process (psutil) between batches."""

    soft_ratio: float = Field(
        default=0.8, description="Above this share of the limit, halve the batch size."
    )
    min_batch_size: int = Field(default=100, description="Never shrink batches below this.")
    max_soft_strikes: int = Field(
        default=3,
        description="Fail after this many consecutive batches above the soft threshold at "
        "the minimum batch size.",
    )

    def budget(self, limit_mb: float, batch_size: int) -> MemoryBudget:
        return MemoryBudget(
            limit_mb=limit_mb,
            batch_size=batch_size,
            soft_ratio=self.soft_ratio,
            min_batch_size=min(self.min_batch_size, batch_size),
            max_soft_strikes=self.max_soft_strikes,
        )
