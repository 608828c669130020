"""The targets file: which deployment to load and as whom.

Written by ``tenantfleet loadtest prepare`` (0600: it holds API keys) or by hand for an
existing deployment::

    {"version": 1, "url": "http://127.0.0.1:8400",
     "tenants": [{"tenantId": "…", "code": "lt-0001", "shardId": "shard1", "apiKey": "…", "items": 20}, …]}

``items``: the tenant has items with ids 1..items (users read and update those).
`load_targets` refuses anything else, naming the field (`LoadtestError` VALIDATION_FAILED).
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loadtests.errors import LoadtestError

TARGETS_VERSION = 1
MAX_TENANTS = 100_000


@dataclass(frozen=True)
class Tenant:
    tenantId: str
    code: str
    shardId: str
    apiKey: str
    items: int


@dataclass(frozen=True)
class Targets:
    url: str
    tenants: tuple[Tenant, ...]

    def to_api(self) -> dict[str, Any]:
        return {"version": TARGETS_VERSION, "url": self.url, "tenants": [asdict(t) for t in self.tenants]}


def _bad(path: Path | str, message: str) -> LoadtestError:
    return LoadtestError("VALIDATION_FAILED", f"targets file {path}: {message}")


def check_url(url: str, where: str) -> str:
    """``url`` without a trailing slash, if it is http(s)://host[:port] with nothing after the
    host but an optional path; else VALIDATION_FAILED."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise LoadtestError("VALIDATION_FAILED", f"{where}: {url!r} is not an http(s) URL of a host")
    try:
        parts.port
    except ValueError:
        raise LoadtestError("VALIDATION_FAILED", f"{where}: {url!r} has a bad port") from None
    return url.rstrip("/")


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_targets(doc: Any, where: str) -> Targets:
    if not isinstance(doc, dict):
        raise _bad(where, "must be a JSON object")
    unknown = set(doc) - {"version", "url", "tenants", "createdAt", "plugin", "pluginVersion"}
    if unknown:
        raise _bad(where, f"unknown key(s) {', '.join(sorted(unknown))}")
    if doc.get("version") != TARGETS_VERSION:
        raise _bad(where, f"version must be {TARGETS_VERSION}, not {doc.get('version')!r}")
    if not isinstance(doc.get("url"), str):
        raise _bad(where, "url must be a string")
    url = check_url(doc["url"], f"targets file {where}: url")
    raw = doc.get("tenants")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_TENANTS:
        raise _bad(where, f"tenants must be a list of 1-{MAX_TENANTS} tenants")
    tenants = []
    seen: set[str] = set()
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise _bad(where, f"tenants[{i}] must be an object")
        extra = set(t) - {"tenantId", "code", "shardId", "apiKey", "items"}
        if extra:
            raise _bad(where, f"tenants[{i}]: unknown key(s) {', '.join(sorted(extra))}")
        for key in ("tenantId", "code", "shardId", "apiKey"):
            value = t.get(key)
            if not isinstance(value, str) or not 1 <= len(value) <= 200 or not value.isprintable():
                raise _bad(where, f"tenants[{i}].{key} must be a printable string of 1-200 characters")
        items = t.get("items")
        if isinstance(items, bool) or not isinstance(items, int) or not 1 <= items <= 1_000_000:
            raise _bad(where, f"tenants[{i}].items must be an integer between 1 and 1000000")
        if t["code"] in seen:
            raise _bad(where, f"tenants[{i}]: tenant {t['code']!r} is listed twice")
        seen.add(t["code"])
        tenants.append(Tenant(t["tenantId"], t["code"], t["shardId"], t["apiKey"], items))
    return Targets(url, tuple(tenants))


def load_targets(path: Path) -> Targets:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _bad(path, "no such file (make one with `tenantfleet loadtest prepare`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"can't be read as JSON ({exc})") from None
    return parse_targets(doc, str(path))


def write_targets(path: Path, targets: Targets) -> None:
    """Write ``targets`` to ``path`` readable by its owner only (it holds API keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(json.dumps(targets.to_api(), indent=2) + "\n", encoding="utf-8")
