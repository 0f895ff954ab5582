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
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryError(f"{path}: bad entry for patch {name!r}: {exc}") from None
    return ProjectConfig(patches, raw.get("security") or {}, raw.get("scheduling") or {})


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
