"""The patch class is the single source of truth: what a patch touches comes from its class (not
from data_patches.yml), every patch declares a valid example config, and the run files in
config/runs/ are those example configs."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest
import yaml

from patch_ops.patch import Patch, PatchSettings
from stockrx_patches.patches.batch_expiry_update import BatchExpiryUpdate
from stockrx_patches.patches.inventory_price_adjustment import InventoryPriceAdjustment
from stockrx_patches.registry import (
    ProjectConfig,
    RegistryError,
    build_registry,
    default_registry,
    load_project_config,
)
from stockrx_patches.tables import INVENTORY_LOG_INSERTS, STOCKRX_TABLES, inventory_log_rows

REPO = Path(__file__).resolve().parents[2]
RUNS = REPO / "config" / "runs"
ENTRY = "patches:\n  p:\n    description: d\n"


def test_target_tables_in_the_settings_is_refused_in_one_line(tmp_path):
    path = tmp_path / "p.yml"
    path.write_text(ENTRY + "    target_tables: [inventories]\n")
    with pytest.raises(RegistryError) as err:
        load_project_config(path)
    message = str(err.value)
    assert "\n" not in message
    assert "patch 'p': target_tables is derived from the patch class" in message
    assert "delete the target_tables line" in message
    path.write_text(ENTRY)
    assert load_project_config(path).patches["p"].description == "d"


def test_what_a_patch_touches_comes_from_its_class():
    assert "target_tables" not in {f.name for f in dataclasses.fields(PatchSettings)}
    assert "target_tables" not in (REPO / "config" / "data_patches.yml").read_text()
    patches = default_registry().patches
    assert patches["inventory_price_adjustment"].written_tables() == (
        "inventories", "inventory_logs"
    )
    assert patches["batch_expiry_update"].written_tables() == (
        "inventories", "batches", "inventory_logs"
    )
    for patch in patches.values():
        assert set(patch.tables()) <= set(STOCKRX_TABLES)


class _Bare(Patch):
    """A patch that forgot its example config."""

    name = "bare"
    driving_table = "inventories"
    updates = {"inventories": ("updated_at",)}


def _registry_of(*patches: Patch):  # type: ignore[no-untyped-def]
    settings = {p.name: PatchSettings(description="d") for p in patches}
    return build_registry({p.name: p for p in patches}, ProjectConfig(settings))


def test_a_patch_without_example_config_is_refused():
    with pytest.raises(RegistryError) as err:
        _registry_of(_Bare())
    message = str(err.value)
    assert message.startswith(f"patch 'bare' ({__name__}._Bare) has no example_config: add ")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("example", "reason"),
    [
        ({"adjustment_type": "percent", "adjustment_value": 8}, "adjustment_type"),
        ({"adjustment_type": "percentage"}, "adjustment_value"),
        ({"adjustment_type": "multiply", "adjustment_value": 0}, "multiply needs"),
        ({"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": False}, "dry run"),
    ],
)
def test_an_example_config_that_is_not_a_valid_dry_run_is_refused(example, reason):
    class Wrong(InventoryPriceAdjustment):
        name = "wrong"
        example_config = example

    with pytest.raises(RegistryError, match=reason) as err:
        _registry_of(Wrong())
    assert str(err.value).startswith("patch 'wrong' (") and "\n" not in str(err.value)


def test_every_patch_has_a_valid_example_config():
    for patch in default_registry().patches.values():
        config = patch.config_class(**patch.example_config)
        assert config.dry_run is True
        patch.check_config(config)


def _plan_config(path: Path) -> dict:  # type: ignore[type-arg]
    return yaml.safe_load(path.read_text())["ops"]["plan_patch"]["config"]


def test_the_run_files_are_the_example_configs():
    """config/runs/<patch>.yaml is the example config as a dry run, <patch>.real.yaml the same
    as a real run (kept by hand for their comments; this test keeps them equal)."""
    patches = default_registry().patches
    checked = []
    for path in sorted(RUNS.glob("*.yaml")):
        name, _, real = path.name.removesuffix(".yaml").partition(".")
        if name not in patches:
            continue
        wanted = {**patches[name].example_config, "dry_run": real != "real"}
        assert _plan_config(path) == wanted, f"{path.name} differs from {name}.example_config"
        checked.append(path.name)
    assert {"inventory_price_adjustment.yaml", "inventory_price_adjustment.real.yaml",
            "batch_expiry_update.yaml", "batch_expiry_update.real.yaml"} <= set(checked)


def test_both_patches_insert_the_shared_inventory_log_columns():
    for patch in (InventoryPriceAdjustment, BatchExpiryUpdate):
        assert patch.inserts["inventory_logs"] is INVENTORY_LOG_INSERTS
    run_at = dt.datetime(2026, 11, 29, 1, 2, 3)
    rows = inventory_log_rows(
        run_at, source_id=[7, 8], inventory_id=[7, 8], delta=0, operation_type="adjust",
        previous_quantity=[1, 2], current_quantity=[1, 2], note=None, user_id=None,
    )
    assert list(rows.columns) == ["source_id", *INVENTORY_LOG_INSERTS]
    assert (rows["created_at"] == run_at).all() and (rows["updated_at"] == run_at).all()
    with pytest.raises(ValueError, match=r"missing \['user_id'\], unknown \['usr_id'\]"):
        inventory_log_rows(
            run_at, source_id=[7], inventory_id=[7], delta=0, operation_type="adjust",
            previous_quantity=[1], current_quantity=[1], note=None, usr_id=None,
        )
