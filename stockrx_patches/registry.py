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

from patch_ops.patch import Patch, PatchSettings
from patch_ops.windows import DEFAULT_FIRST_RUN_ROWS_PER_SECOND, WindowConfigError, parse_windows

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "config" / "data_patches.yml"


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
        try:
            patches[name] = PatchSettings(
                description=str(entry["description"]),
                target_tables=tuple(entry["target_tables"]),
                estimated_records=int(entry.get("estimated_records", 10_000)),
                batch_size=int(entry.get("batch_size", 1000)),
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


def _positive(entry: dict[str, Any], key: str, default: float) -> float:
    value = float(entry.get(key, default))
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{key} must be a positive number, got {value!r}")
    return value


def _count(entry: dict[str, Any], key: str, default: int) -> int:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a whole number of at least 1, got {value!r}")
    return value


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
    for name, patch in patches.items():
        written = set(patch.updates) | set(patch.inserts)
        declared = set(config.patches[name].target_tables)
        if written != declared:
            raise RegistryError(
                f"{name}: target_tables in data_patches.yml {sorted(declared)} differ from the "
                f"tables the patch writes {sorted(written)}"
            )
    return Registry(patches, config)


@lru_cache(maxsize=1)
def default_registry() -> Registry:
    return build_registry(discover_patches(), load_project_config())
