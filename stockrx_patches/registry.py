"""Finds the patches (one module each in stockrx_patches/patches/) and their YAML settings."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from patch_ops.jobs import table_tags
from patch_ops.patch import FAIL, HOLD_BACK, Patch, PatchSettings
from patch_ops.windows import DEFAULT_FIRST_RUN_ROWS_PER_SECOND, WindowConfigError, parse_windows

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "config" / "data_patches.yml"
#: The committed Dagster instance config that `stockrx-patches instance-config` starts from.
DEFAULT_INSTANCE_BASE = REPO_ROOT / "dagster.yaml"


class RegistryError(RuntimeError):
    pass


@dataclass(frozen=True)
class ProjectConfig:
    """config/data_patches.yml, parsed."""

    patches: dict[str, PatchSettings]
    security: dict[str, Any] = field(default_factory=dict)
    scheduling: dict[str, Any] = field(default_factory=dict)


def config_path() -> Path:
    return Path(os.environ.get("STOCKRX_PATCHES_CONFIG", DEFAULT_CONFIG))


def load_project_config(path: Path | None = None) -> ProjectConfig:
    path = path or config_path()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise RegistryError(f"patch settings file not found: {path}") from None
    scheduling = raw.get("scheduling") or {}
    try:
        windows = parse_windows(scheduling)
        first_rate = _positive(
            scheduling, "first_run_rows_per_second", DEFAULT_FIRST_RUN_ROWS_PER_SECOND
        )
    except (WindowConfigError, TypeError, ValueError) as exc:
        raise RegistryError(f"{path}: scheduling: {exc}") from None
    patches = {}
    for name, entry in (raw.get("patches") or {}).items():
        if isinstance(entry, dict) and "target_tables" in entry:
            raise RegistryError(
                f"{path}: patch {name!r}: target_tables is derived from the patch class (the "
                "tables it updates and inserts into): delete the target_tables line"
            )
        try:
            patches[name] = PatchSettings(
                description=str(entry["description"]),
                estimated_records=int(entry.get("estimated_records", 10_000)),
                batch_size=int(entry.get("batch_size", 1000)),
                batch_seconds=_positive(entry, "batch_seconds", 2.0, zero=True),
                memory_limit_mb=int(entry.get("memory_limit", 1024)),
                max_failure_ratio=entry.get("max_failure_ratio"),
                scheduled=bool(entry.get("scheduled", False)),
                require_approved_plan=_flag(entry, "require_approved_plan", True),
                plan_valid_hours=_positive(entry, "plan_valid_hours", 24.0),
                query_timeout_seconds=_positive(entry, "query_timeout_seconds", 900.0),
                check_connections=_count(entry, "check_connections", 2),
                maintenance_windows=windows,
                first_run_rows_per_second=first_rate,
                schedule_config=_schedule_config(entry),
                on_refused_rows=_choice(entry, "on_refused_rows", (HOLD_BACK, FAIL)),
                max_held_back_percent=_percent(entry, "max_held_back_percent", 10.0),
                refusal_search_seconds=_positive(entry, "refusal_search_seconds", 300.0),
                refusal_attempt_seconds=_positive(entry, "refusal_attempt_seconds", 30.0),
                trial_slice_rows=_count(entry, "trial_slice_rows", 10_000),
                trial_slice_seconds=_positive(entry, "trial_slice_seconds", 1.0, zero=True),
                max_drift_percent=_percent(entry, "max_drift_percent", 1.0),
                require_distinct_approver=_flag(entry, "require_distinct_approver", False),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryError(f"{path}: bad entry for patch {name!r}: {exc}") from None
    for name, s in patches.items():
        if s.scheduled and not windows:
            raise RegistryError(
                f"{path}: patch {name!r} is scheduled but scheduling.maintenance_windows is empty "
                "(its schedule runs at the start of every window)"
            )
        if s.scheduled and not s.schedule_config.get("dry_run", True) and s.require_approved_plan:
            raise RegistryError(
                f"{path}: patch {name!r} is scheduled for real runs, which no dry run approves: "
                "set require_approved_plan: false for it (or schedule_config: {dry_run: true})"
            )
    return ProjectConfig(patches, raw.get("security") or {}, scheduling)


def _schedule_config(entry: dict[str, Any]) -> dict[str, Any]:
    """Run config (ops.plan_patch.config) of a scheduled patch's runs; default: real runs."""
    value = entry.get("schedule_config", {"dry_run": False})
    if not isinstance(value, dict):
        raise ValueError(f"schedule_config must be a mapping, got {value!r}")
    return {"dry_run": False, **value}


def _flag(entry: dict[str, Any], key: str, default: bool) -> bool:
    # A YAML typo like `require_approved_plan: "no"` must not silently read as true.
    value = entry.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _positive(entry: dict[str, Any], key: str, default: float, zero: bool = False) -> float:
    """A finite number > 0 (``zero``: >= 0)."""
    value = float(entry.get(key, default))
    if not (value >= 0 if zero else value > 0) or value == float("inf"):
        raise ValueError(f"{key} must be {'a number >= 0' if zero else 'a positive number'}, "
                         f"got {value!r}")
    return value


def _choice(entry: dict[str, Any], key: str, allowed: tuple[str, ...]) -> str | None:
    value = entry.get(key)
    if value is not None and value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _percent(entry: dict[str, Any], key: str, default: float) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise ValueError(f"{key} must be a number from 0 to 100 (percent), got {value!r}")
    return float(value)


def _count(entry: dict[str, Any], key: str, default: int) -> int:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a whole number of at least 1, got {value!r}")
    return value


def check_patch(patch: Patch) -> None:
    """What the registry needs of a patch class beyond its type: an example config that is a
    valid dry-run config of it (tests, config/runs/ and the generator's test use it)."""
    cls = type(patch)
    where = f"patch {patch.name!r} ({cls.__module__}.{cls.__qualname__})"
    example = getattr(cls, "example_config", None)
    if not isinstance(example, dict):
        raise RegistryError(
            f"{where} has no example_config: add a class attribute example_config = {{...}}, "
            "a valid dry-run config of it (ops.plan_patch.config without dry_run)"
        )
    if example.get("dry_run", True) is not True:
        raise RegistryError(f"{where}: example_config must be a dry run (drop dry_run from it)")
    try:
        patch.check_config(patch.config_class(**example))
    except Exception as exc:  # noqa: BLE001 - pydantic or PatchConfigError: same message
        first = str(exc).strip().splitlines()
        raise RegistryError(
            f"{where}: example_config {example!r} is not a valid config: "
            + " ".join(line.strip() for line in first[:3])
        ) from None


def discover_patches(package: str = "stockrx_patches.patches") -> dict[str, Patch]:
    """Every Patch subclass defined in a module of the package, keyed by its name."""
    pkg = importlib.import_module(package)
    found: dict[str, Patch] = {}
    for mod in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{package}.{mod.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Patch) and obj is not Patch and obj.__module__ == module.__name__:
                if obj.name in found:
                    raise RegistryError(f"two patches are named {obj.name!r}")
                found[obj.name] = obj()
    return found


@dataclass(frozen=True)
class Registry:
    patches: dict[str, Patch]
    config: ProjectConfig

    def settings(self, name: str) -> PatchSettings:
        return self.config.patches[name]

    def get(self, name: str) -> Patch:
        try:
            return self.patches[name]
        except KeyError:
            known = ", ".join(sorted(self.patches))
            raise RegistryError(f"unknown patch {name!r}; known patches: {known}") from None


def build_registry(patches: dict[str, Patch], config: ProjectConfig) -> Registry:
    """Check that code and settings agree before anything can run."""
    missing = sorted(set(patches) - set(config.patches))
    if missing:
        raise RegistryError(f"patch(es) without an entry in data_patches.yml: {missing}")
    orphans = sorted(set(config.patches) - set(patches))
    if orphans:
        raise RegistryError(f"data_patches.yml entries without a patch: {orphans}")
    for patch in patches.values():
        check_patch(patch)
    return Registry(patches, config)


@lru_cache(maxsize=1)
def default_registry() -> Registry:
    return build_registry(discover_patches(), load_project_config())


# ---------------------------------------------------------------------------------------------
# Dagster instance config: run-queue limits derived from the patch classes
# ---------------------------------------------------------------------------------------------


def table_tag_limits(registry: Registry) -> list[dict[str, Any]]:
    """One run at a time per table tag of every patch job (``patch_ops.jobs.table_tags``: one
    ``stockrx-table/<table>`` per table of ``patch.tables()``), in table name order."""
    keys = sorted({k for p in registry.patches.values() for k in table_tags(p)})
    return [{"key": k, "limit": 1} for k in keys]


def instance_config(base: Path | None = None, registry: Registry | None = None) -> dict[str, Any]:
    """The Dagster instance config ``base`` (default: the repo's dagster.yaml) with a
    ``concurrency.runs.tag_concurrency_limits`` entry of limit 1 for every table of every
    registered patch, after the limits the base already has. A base that allows a table tag more
    than one run is refused (it would let two patches write one table)."""
    base = base or DEFAULT_INSTANCE_BASE
    registry = registry or default_registry()
    try:
        config = yaml.safe_load(base.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise RegistryError(f"instance config base not found: {base}") from None
    if not isinstance(config, dict):
        raise RegistryError(f"{base}: not a YAML mapping")
    runs = (config.setdefault("concurrency", None) or {}).get("runs") or {}
    limits = list(runs.get("tag_concurrency_limits") or [])
    present = {lim.get("key"): lim for lim in limits if "value" not in lim}
    for wanted in table_tag_limits(registry):
        have = present.get(wanted["key"])
        if have is None:
            limits.append(wanted)
        elif have.get("limit") != 1:
            raise RegistryError(
                f"{base}: {wanted['key']} is limited to {have.get('limit')} runs; one patch per "
                "table needs 1 (delete that entry: instance-config adds it)"
            )
    config["concurrency"] = {
        **(config["concurrency"] or {}),
        "runs": {**runs, "tag_concurrency_limits": limits},
    }
    return config


def instance_config_yaml(base: Path | None = None, registry: Registry | None = None) -> str:
    """:func:`instance_config` as the text of a ``$DAGSTER_HOME/dagster.yaml``."""
    base = base or DEFAULT_INSTANCE_BASE
    head = (
        f"# Generated by `stockrx-patches instance-config` from {base.name}: one run at a time per\n"
        "# table of every patch (tag stockrx-table/<table>). Do not edit: change the base and\n"
        "# generate again (also after adding a patch).\n"
    )
    return head + yaml.safe_dump(instance_config(base, registry), sort_keys=False)
