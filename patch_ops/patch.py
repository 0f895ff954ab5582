"""What a patch declares. The framework owns everything else (iteration, backup, staging,
validation, commit, verification, history).

A patch is a subclass of :class:`Patch` in one small file: a typed config, which rows it targets,
a pure ``transform`` from a batch of before-images to changes, pandera schemas and SQL invariants.
It never opens a session, commits, logs progress or notifies.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from dagster import Config
from pydantic import Field
from sqlalchemy import FromClause, Select, Table

from patch_ops.windows import DEFAULT_FIRST_RUN_ROWS_PER_SECOND, MaintenanceWindow

if TYPE_CHECKING:  # the code location's process loads patches without pandas and pandera
    import pandas as pd
    import pandera.pandas as pa

MAX_LAUNCHED_BY = 255  # data_patch_executions.launched_by, audit actor
#: ``transform_path`` values: in the database (INSERT ... SELECT) or in Python (pandas batches).
SQL_PATH, PYTHON_PATH = "sql", "python"
#: ``on_refused_rows`` values: hold back the rows the database refuses, or fail the run.
HOLD_BACK, FAIL = "hold_back", "fail"


class PatchConfigError(ValueError):
    """The run config is well-typed but not acceptable for this patch (e.g. out of range)."""


class PatchRunConfig(Config):
    """Options every patch run has. A patch's config class extends this one."""

    dry_run: bool = Field(
        default=True,
        description="Go through every step but stop before commit and report what would change. "
        "A real run needs an explicit dry_run: false.",
    )
    batch_size: int | None = Field(
        default=None,
        description="Driving rows the transform reads, checks and stages at a time (the memory "
        "guard may halve it); default from config/data_patches.yml.",
    )
    memory_limit_mb: int | None = Field(
        default=None,
        description="Memory (MB) the transform step may add to its process (RSS above what it "
        "held when the step began). Above 80 % of it the batch is halved (down to 100 rows); "
        "three batches in a row above 80 % at the minimum, or one above 100 %, fail the run "
        "before anything is committed. Default from config/data_patches.yml.",
    )
    launched_by: str | None = Field(
        default=None,
        description="Who launched this run (recorded in the history); default: the OS user.",
    )
    allow_outside_window: bool = Field(
        default=False,
        description="Let a real run start outside the maintenance windows of "
        "config/data_patches.yml (scheduling.maintenance_windows). Recorded in the history; "
        "without it such a run is refused.",
    )
    allow_repeat: bool = Field(
        default=False,
        description="Let a real run apply the patch again where an earlier real run with the "
        "same config already did (or, with a release, a real run for the same release): a "
        "relative change such as +8 % would be applied twice. Recorded in the history; without "
        "it such a run is refused.",
    )
    release: str | None = Field(
        default=None,
        description="The release this run belongs to (e.g. the release tag). A second real run "
        "of the patch for the same release is refused unless allow_repeat is set.",
    )
    resume_execution_id: str | None = Field(
        default=None,
        description="Continue this paused execution (stopped at the end of a maintenance window) "
        "instead of planning a new one; the rest of the config must be the same as its own. "
        "Without it, a run whose config equals a paused execution's continues that one.",
    )

    transform_path: str | None = Field(
        default=None,
        description="How the transform stages the changes: 'sql' (in the database, one INSERT "
        "... SELECT per table per batch) or 'python' (pandas batches). Default: 'sql' for a "
        "patch that declares its change in SQL and whose checks all compile to SQL, else "
        "'python'. Both stage identical rows; how, not what (not part of the plan hash).",
    )
    batch_seconds: float | None = Field(
        default=None,
        description="Target seconds per transform batch: the batch size is adjusted from the "
        "last batches' durations (bounded by the memory guard in Python). Ignored when "
        "batch_size is set (fixed batches). Default from config/data_patches.yml (2).",
    )

    def value_problem(self) -> str | None:
        """Why a value of this config cannot be stored or run (None: none), for every patch's
        config: no NaN or infinity, integers within 64 bits (batch and memory sizes within 32),
        no NUL character in text, launched_by and release one printable line within their
        columns. Dagster checks the types; this checks the rest, and the plan refuses in one line
        before anything is written (a value PostgreSQL would refuse mid-run never gets there).
        Not a pydantic validator: Dagster would report its error as a traceback around the op."""
        for name, value in self:
            if isinstance(value, float) and not math.isfinite(value):
                return f"{name} must be a finite number, got {value}"
            if isinstance(value, int) and not isinstance(value, bool):
                limit = 2**31 if name in ("batch_size", "memory_limit_mb") else 2**63
                if not -limit <= value < limit:
                    return f"{name} is out of range, got {value}"
            if isinstance(value, str) and "\x00" in value:
                return f"{name} must not contain NUL characters"
        if self.transform_path not in (None, SQL_PATH, PYTHON_PATH):
            return f"transform_path must be {SQL_PATH!r} or {PYTHON_PATH!r}, got {self.transform_path!r}"
        if self.batch_seconds is not None and not self.batch_seconds > 0:
            return f"batch_seconds must be positive, got {self.batch_seconds}"
        if self.release is not None and (
            len(self.release) > MAX_LAUNCHED_BY or not self.release.isprintable()
        ):
            return f"release must be one line of printable characters, at most {MAX_LAUNCHED_BY}"
        if self.launched_by:  # "" or None: the OS user
            if len(self.launched_by) > MAX_LAUNCHED_BY:
                return f"launched_by is longer than {MAX_LAUNCHED_BY} characters"
            if not self.launched_by.strip() or not self.launched_by.isprintable():
                # It goes into history, reports and messages: a newline there forges lines.
                return (
                    "launched_by must be one line of printable characters naming who launched "
                    "the run (no newlines, tabs or control characters)"
                )
        return None


@dataclass(frozen=True)
class RunContext:
    """Facts fixed at plan time, so a re-executed transform produces identical rows."""

    execution_id: str
    run_at: dt.datetime  # UTC, naive (Rails stores UTC in datetime(6))
    business_date: dt.date  # the run's date in the patch's time zone


@dataclass
class Changes:
    """What a transform returns for one batch.

    ``updates[table]``: after-images with ``id``, ``source_id`` and every column the patch
    declares in ``updates`` for that table. ``inserts[table]``: new rows with ``source_id`` and
    the columns the patch declares in ``inserts``. ``source_id`` is the id of the driving row
    the change comes from; all changes of one source are accepted or rejected together.
    """

    updates: dict[str, pd.DataFrame] = field(default_factory=dict)
    inserts: dict[str, pd.DataFrame] = field(default_factory=dict)


@dataclass
class SqlChanges:
    """What ``Patch.sql_transform`` returns for one batch: the same changes as ``transform``'s,
    as SELECTs the framework stages with ``INSERT ... SELECT``.

    ``updates[table]``: columns ``id``, ``source_id`` and the patch's ``updates`` columns.
    ``inserts[table]``: ``source_id``, the patch's ``inserts`` columns and the columns named in
    ``insert_order[table]``, which number the inserted rows in the order ``transform`` returns
    them (order-only columns are not staged).
    """

    updates: dict[str, Select[Any]] = field(default_factory=dict)
    inserts: dict[str, Select[Any]] = field(default_factory=dict)
    insert_order: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Invariant:
    """A whole-set rule: ``offenders`` selects the rows that break it (none = it holds).

    ``screen``: (source, aggregate over source) that is 0 exactly when no row offends (another
    value: the offenders are counted and named as without it). Invariants that screen over the
    same source are screened together, in one query; ``offenders`` runs only for those whose
    screen is not 0, so several checks that join the same rows read them once when they hold.
    """

    name: str
    description: str
    offenders: Select
    screen: tuple[Any, Any] | None = None


class Tables(Mapping[str, Table]):
    """Live StockRx tables as reflected from the database (name → Table)."""

    def __init__(self, tables: dict[str, Table]):
        self._tables = tables

    def __getitem__(self, name: str) -> Table:
        try:
            return self._tables[name]
        except KeyError:
            raise KeyError(f"table {name!r} was not reflected") from None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._tables)

    def __len__(self) -> int:
        return len(self._tables)


T = TypeVar("T")


class lazy_declaration(Generic[T]):  # noqa: N801 - used as a decorator, like property
    """A patch class attribute made by its function when first read, then kept.

    For declarations that need pandera or pandas: the code location's processes (the CLI,
    webserver, daemon) only build jobs from the patches and never read them, so they do not pay
    those imports (~1 s); the ops' fork server reads them once (:func:`resolve_declarations`).
    Read as ``patch.schemas`` or ``PatchClass.schemas``, like a plain class attribute::

        @lazy_declaration
        def schemas():
            from stockrx_patches.schemas import InventorySchema
            return {"inventories": InventorySchema}
    """

    def __init__(self, make: Callable[[], T]) -> None:
        self.make = make
        self.__doc__ = make.__doc__
        self.made = False
        self.value: T

    def __get__(self, obj: Any, owner: type | None = None) -> T:
        if not self.made:  # two threads at once both get the same classes: imports are cached
            self.value = self.make()
            self.made = True
        return self.value


def resolve_declarations() -> None:
    """Read every lazy declaration of every patch class defined so far (the fork server does,
    so the op processes forked from it share what they import and build)."""
    todo = [Patch]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        for value in list(vars(cls).values()):
            if isinstance(value, lazy_declaration):
                value.__get__(None, cls)


class Patch:
    """Base class of every patch. Subclasses set the class attributes and two methods."""

    name: ClassVar[str]
    config_class: ClassVar[type[PatchRunConfig]] = PatchRunConfig
    #: The table whose ids are frozen, batched and count as "records".
    driving_table: ClassVar[str]
    #: Other tables loaded with each batch: table → column holding the driving row's id.
    related: ClassVar[dict[str, str]] = {}
    #: Columns the patch may change, per table (all are backed up and restored together).
    updates: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: Columns the patch fills in the rows it inserts, per table.
    inserts: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: pandera schemas for the changed/inserted rows, per table; declared with
    #: :class:`lazy_declaration` so that loading the patch does not import pandera.
    schemas: ClassVar[dict[str, type[pa.DataFrameModel]]] = {}
    #: Share of driving rows allowed to fail validation before the run is failed (0 = none).
    max_failure_ratio: ClassVar[float] = 0.0
    #: Time zone of the business date.
    timezone: ClassVar[str] = "Asia/Tokyo"
    #: Running it again changes only what still needs it: its targets leave out rows it has
    #: already done (e.g. lots already written off). False (the default): a real run with the
    #: same config as an earlier one that changed any of today's targets is refused as a repeat
    #: unless its config says allow_repeat (a +8 % must not be applied twice).
    idempotent: ClassVar[bool] = False
    #: Columns whose change between the approving dry run and the real run is drift
    #: (patch_ops.steps.drift), per driving or related table. None: the updated columns but the
    #: application's bookkeeping (created_at/updated_at, *_count counter caches), with a related
    #: table's link to its driving row.
    drift_columns: ClassVar[dict[str, tuple[str, ...]] | None] = None
    #: A valid dry-run config of this patch (``ops.plan_patch.config`` without ``dry_run``), e.g.
    #: ``{"adjustment_type": "percentage", "adjustment_value": 8}``. Required: the registry
    #: refuses a patch without one; tests and the run files in config/runs/ use it.
    example_config: ClassVar[dict[str, Any]]

    def check_config(self, config: Any) -> None:
        """Raise PatchConfigError for a config that is typed right but not acceptable."""

    def targets(self, tables: Tables, config: Any, ctx: RunContext) -> dict[str, Select]:
        """Per updated table, a SELECT of the ids (one column) the patch may change."""
        raise NotImplementedError(f"{type(self).__name__} must define targets()")

    def transform(
        self, batch: dict[str, pd.DataFrame], config: Any, ctx: RunContext
    ) -> Changes:
        """Pure function: before-images of one batch in, changes out. No I/O."""
        raise NotImplementedError(f"{type(self).__name__} must define transform()")

    def sql_transform(
        self, batch: Mapping[str, FromClause], config: Any, ctx: RunContext
    ) -> SqlChanges | None:
        """The same change as ``transform`` in SQL, for the in-database path: ``batch[table]``
        holds the batch's before-images (the live columns; decimals as floats, as ``transform``
        sees them). None (the default): the patch needs Python; the pandas path runs it."""
        return None

    def invariants(self, result: Any, config: Any) -> list[Invariant]:
        """Whole-set rules checked on the would-be result and again after commit."""
        return []

    def business_date(self, config: Any, today: dt.date) -> dt.date:
        """The run's business date: ``today`` in the patch's time zone, unless the patch lets
        its config name another (an invalid value is left to ``check_config`` to report)."""
        return today

    def report_sections(self, tables: Tables, config: Any, ctx: RunContext) -> dict[str, Select]:
        """Extra lists for the impact report, e.g. rows the patch deliberately leaves alone:
        title → SELECT of the rows to list (in the order to show). The engine counts each one
        and keeps its first rows in the report (JSON and Markdown)."""
        return {}

    # Derived declarations -------------------------------------------------------------
    @classmethod
    def description(cls) -> str:
        doc = (cls.__doc__ or cls.name).strip()
        return doc.splitlines()[0]

    @classmethod
    def tables(cls) -> tuple[str, ...]:
        names = [cls.driving_table, *cls.related, *cls.updates, *cls.inserts]
        return tuple(dict.fromkeys(names))

    @classmethod
    def written_tables(cls) -> tuple[str, ...]:
        """The tables the patch updates or inserts into."""
        return tuple(dict.fromkeys([*cls.updates, *cls.inserts]))

    @classmethod
    def required_columns(cls) -> dict[str, set[str]]:
        need: dict[str, set[str]] = {t: {"id"} for t in cls.tables()}
        for table, fk in cls.related.items():
            need[table].add(fk)
        for spec in (cls.updates, cls.inserts):
            for table, cols in spec.items():
                need[table].update(cols)
        for table, schema in cls.schemas.items():
            if table in need:
                need[table].update(
                    c for c in schema.to_schema().columns if c not in ("source_id",)
                )
        return need


@dataclass(frozen=True)
class PatchSettings:
    """Operational settings of a patch, from config/data_patches.yml. What the patch touches is
    not here: it comes from the patch class (``Patch.tables()``, ``Patch.written_tables()``)."""

    description: str
    estimated_records: int = 10_000
    batch_size: int = 1000
    #: Target seconds per transform batch (duration-sized batches, patch_ops.steps.batching).
    batch_seconds: float = 2.0
    memory_limit_mb: int = 1024
    max_failure_ratio: float | None = None  # None: the patch's own default
    scheduled: bool = False
    #: A real run needs a completed dry run with the same plan hash (patch_ops.approval).
    require_approved_plan: bool = True
    #: How long a dry run's plan stays valid for approving a real run.
    plan_valid_hours: float = 24.0
    #: Longest an invariant query may run (PostgreSQL statement_timeout); longer = not verified.
    query_timeout_seconds: float = 900.0
    #: Read-only check queries (invariants, impact report, post-verification) run at once, each
    #: on its own connection, beside validation's trial apply; so do the transform's statements
    #: that stage a batch's updated and its inserted rows. 1: one after another.
    check_connections: int = 2
    #: When real runs may write (patch_ops.windows); empty: any time.
    maintenance_windows: tuple[MaintenanceWindow, ...] = ()
    #: Rows per second assumed for the duration estimate until the patch has a completed run.
    first_run_rows_per_second: float = DEFAULT_FIRST_RUN_ROWS_PER_SECOND
    #: Run config (ops.plan_patch.config) of the scheduled runs, if ``scheduled``.
    schedule_config: Mapping[str, Any] = field(default_factory=lambda: {"dry_run": False})
    #: Driving rows whose changes the database refuses (patch_ops.steps.holdback):
    #: "hold_back" rejects them and commits the rest, "fail" fails the run. None: hold_back for
    #: scheduled patches (unattended, run again at every window: a few refused rows must not
    #: stop every other row, and the next window retries them), fail otherwise (a release-time
    #: patch that someone launches should not be committed in part unless they chose so).
    on_refused_rows: str | None = None
    #: Above this share of the driving rows (percent, 0-100) held back, the run fails instead,
    #: changing nothing (the original design's "10 % inconsistent" criterion).
    max_held_back_percent: float = 10.0
    #: Longest the search for refused rows may take in all, and one attempt's statements (each
    #: attempt holds its row locks no longer than its transaction).
    refusal_search_seconds: float = 300.0
    refusal_attempt_seconds: float = 30.0
    #: Validation's trial apply runs in slices, each its own rolled-back transaction: the first
    #: of this many rows (of the stage's largest table), the next sized to hold their row locks
    #: ``trial_slice_seconds`` (0: every slice ``trial_slice_rows``; patch_ops.steps.trial).
    trial_slice_rows: int = 10_000
    trial_slice_seconds: float = 1.0
    #: Above this share of the target set (percent, 0-100) changed since the approving dry run
    #: in its drift columns, a real run is refused; at or below it those rows are held back.
    max_drift_percent: float = 1.0
    #: A real run must be launched by someone else than its approving dry run (launched_by).
    require_distinct_approver: bool = False

    def refused_rows_policy(self) -> str:
        """``on_refused_rows``, or its default for this patch (hold_back when scheduled)."""
        if self.on_refused_rows is not None:
            return self.on_refused_rows
        return HOLD_BACK if self.scheduled else FAIL
