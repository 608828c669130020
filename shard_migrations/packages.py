"""Finding plugin packages and reading what they ship.

A plugin is a Python package with a module-level ``meta = {"id", "version", "api"}``
(``version`` is SemVer, ``api`` like ``"1.x"``) and, beside its ``__init__.py``:

- ``migrations/public/NNN_name.sql`` and ``migrations/tenant/NNN_name.sql``, applied in
  name order. A file may start with header lines:
  ``-- fleet:version 1.1.0`` (the plugin version that introduced it; default 0.0.0, i.e.
  part of every version) and ``-- fleet:no-transaction`` (run outside a transaction,
  e.g. ``CREATE INDEX CONCURRENTLY``; recorded after it succeeds).
- ``roles.json`` (role templates) and ``manifest.json`` (frontend routes/menu/widgets),
  read by the host.

Plugins are found as subpackages of ``plugins`` and through the ``tenantfleet.plugins``
entry-point group (value: the module path). A package that can't be used is not an
error for the others: it is listed in `Discovery.refused` with its reason.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import semver

from router.errors import PluginNotFound, ValidationFailed

log = logging.getLogger("tenantfleet.discovery")

ENTRY_POINT_GROUP = "tenantfleet.plugins"
PLUGIN_ID_RE = re.compile(r"^[a-z][a-z0-9_]{1,30}$")
FILE_RE = re.compile(r"^[0-9]{3}_[a-z0-9_]+\.sql$")
API_RE = re.compile(r"^([0-9]+)\.x$")
SCOPES = ("public", "tenant")
_HEADER_RE = re.compile(r"^--\s*fleet:([a-z-]+)\s*(.*?)\s*$")


@dataclass(frozen=True)
class MigrationFile:
    plugin_id: str
    scope: str              # "public" | "tenant"
    name: str               # e.g. "002_location.sql"
    path: Path
    sql: str
    checksum: str           # sha256 hex of the file's bytes
    since: semver.Version   # plugin version that introduced the file
    no_transaction: bool


@dataclass(frozen=True)
class PluginPackage:
    id: str
    version: semver.Version
    api: str
    api_major: int
    module: ModuleType
    path: Path
    migrations: tuple[MigrationFile, ...]
    role_templates: tuple[dict[str, Any], ...] = ()
    manifest: dict[str, Any] = field(default_factory=dict)

    def files(self, scope: str, up_to: semver.Version | None = None) -> list[MigrationFile]:
        """This plugin's files of ``scope`` that belong to version ``up_to`` (default: its own)."""
        limit = up_to or self.version
        return [m for m in self.migrations if m.scope == scope and m.since <= limit]

    def check_target(self, to: str | None) -> semver.Version:
        """The version a run goes to: ``to`` if given and shipped, else this package's version.

        Raises VALIDATION_FAILED for a malformed version or one newer than the package.
        """
        if to is None:
            return self.version
        target = parse_version(to, field_name="to")
        if target > self.version:
            raise ValidationFailed(f"plugin {self.id} {self.version} does not ship version {target}",
                                   pluginId=self.id, version=str(target))
        return target


@dataclass
class Discovery:
    plugins: dict[str, PluginPackage] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def get(self, plugin_id: str) -> PluginPackage:
        """The plugin, or PLUGIN_NOT_FOUND (naming why, if it was refused)."""
        pkg = self.plugins.get(plugin_id)
        if pkg is None:
            why = self.refused.get(plugin_id)
            raise PluginNotFound(f"no plugin {plugin_id}" + (f" (refused: {why})" if why else ""), pluginId=plugin_id)
        return pkg


def parse_version(value: str, *, field_name: str = "version") -> semver.Version:
    try:
        return semver.Version.parse(value)
    except (ValueError, TypeError) as exc:
        raise ValidationFailed(f"{field_name} must be a SemVer version like 1.2.0, not {value!r}",
                               field=field_name) from exc


def read_migration(plugin_id: str, scope: str, path: Path) -> MigrationFile:
    raw = path.read_bytes()
    sql = raw.decode("utf-8")
    since = semver.Version(0, 0, 0)
    no_tx = False
    for line in sql.splitlines():
        m = _HEADER_RE.match(line.strip())
        if not m:
            if line.strip() and not line.strip().startswith("--"):
                break  # headers come before the first statement
            continue
        key, value = m.groups()
        if key == "version":
            since = parse_version(value, field_name=f"{path.name} fleet:version")
        elif key == "no-transaction":
            no_tx = True
        else:
            raise ValidationFailed(f"{path}: unknown header fleet:{key}", file=str(path))
    return MigrationFile(plugin_id=plugin_id, scope=scope, name=path.name, path=path, sql=sql,
                         checksum=hashlib.sha256(raw).hexdigest(), since=since, no_transaction=no_tx)


def load_package(module: ModuleType) -> PluginPackage:
    """Read one plugin module. Raises VALIDATION_FAILED saying what is wrong with it."""
    meta = getattr(module, "meta", None)
    name = module.__name__
    if not isinstance(meta, dict):
        raise ValidationFailed(f"{name}: no `meta` dict")
    pid, version, api = meta.get("id"), meta.get("version"), meta.get("api")
    if not isinstance(pid, str) or not PLUGIN_ID_RE.match(pid):
        raise ValidationFailed(f"{name}: meta.id must match {PLUGIN_ID_RE.pattern}")
    if not isinstance(version, str):
        raise ValidationFailed(f"{name}: meta.version must be a SemVer string")
    parsed = parse_version(version, field_name=f"{pid} meta.version")
    api_m = API_RE.match(api) if isinstance(api, str) else None
    if api_m is None or not isinstance(api, str):
        raise ValidationFailed(f"{name}: meta.api must look like '1.x'")
    if module.__file__ is None:
        raise ValidationFailed(f"{name}: not a package with files")
    path = Path(module.__file__).parent
    files: list[MigrationFile] = []
    for scope in SCOPES:
        folder = path / "migrations" / scope
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.suffix != ".sql":
                continue
            if not FILE_RE.match(f.name):
                raise ValidationFailed(f"{f}: migration files are named NNN_name.sql", file=str(f))
            files.append(read_migration(pid, scope, f))
    roles: tuple[dict[str, Any], ...] = ()
    if (path / "roles.json").exists():
        roles = tuple(json.loads((path / "roles.json").read_text()))
    manifest: dict[str, Any] = {}
    if (path / "manifest.json").exists():
        manifest = json.loads((path / "manifest.json").read_text())
    return PluginPackage(id=pid, version=parsed, api=api, api_major=int(api_m.group(1)), module=module, path=path,
                         migrations=tuple(files), role_templates=roles, manifest=manifest)


def discover() -> Discovery:
    """Every plugin under ``plugins/`` and in the ``tenantfleet.plugins`` entry-point group."""
    import plugins as builtin

    found = Discovery()

    def refuse(key: str, modname: str, why: str) -> None:
        found.refused[key] = why
        log.error("plugin %s refused: %s", modname, why)

    names = [f"plugins.{m.name}" for m in pkgutil.iter_modules(builtin.__path__) if m.ispkg]
    names += [ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    for modname in names:
        try:
            pkg = load_package(importlib.import_module(modname))
        except ValidationFailed as exc:
            refuse(modname.rsplit(".", 1)[-1], modname, exc.message)
        except ImportError as exc:
            refuse(modname.rsplit(".", 1)[-1], modname, f"import failed: {exc}")
        else:
            if pkg.id in found.plugins:
                refuse(pkg.id, modname, f"duplicate id (also {found.plugins[pkg.id].module.__name__})")
            else:
                found.plugins[pkg.id] = pkg
    return found
