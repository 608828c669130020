"""Settings are built once, from TOML then environment, and name any bad key."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from router.errors import ConfigInvalid
from router.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("router", "host", "plugins", "shard_migrations", "loadtests")


def test_environment_values_are_typed_and_frozen() -> None:
    s = Settings.load(environ={"TENANTFLEET_SHARDS": "5", "TENANTFLEET_CACHE_TTL_S": "2.5"})
    assert (s.shards, s.cache_ttl_s) == (5, 2.5)
    with pytest.raises(Exception):
        s.shards = 6  # type: ignore[misc]


def test_unknown_environment_key_is_named() -> None:
    with pytest.raises(ConfigInvalid, match="TENANTFLEET_SHARDZ"):
        Settings.load(environ={"TENANTFLEET_SHARDZ": "3"})


def test_bad_value_is_named() -> None:
    with pytest.raises(ConfigInvalid, match="TENANTFLEET_SHARDS"):
        Settings.load(environ={"TENANTFLEET_SHARDS": "many"})


def test_toml_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    cfg = tmp_path / "fleet.toml"
    cfg.write_text('shards = 7\nrouter_port = 9001\n')
    s = Settings.load(environ={"TENANTFLEET_CONFIG": str(cfg), "TENANTFLEET_ROUTER_PORT": "9002"})
    assert (s.shards, s.router_port) == (7, 9002)


def test_unknown_toml_key_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "fleet.toml"
    cfg.write_text('colour = "blue"\n')
    with pytest.raises(ConfigInvalid, match="TENANTFLEET_COLOUR"):
        Settings.load(environ={"TENANTFLEET_CONFIG": str(cfg)})


def test_only_the_settings_module_reads_the_environment() -> None:
    offenders = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if path == ROOT / "router" / "settings.py":
                continue
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and \
                        isinstance(node.value, ast.Name) and node.value.id == "os":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
