"""Settings, built once.

`Settings.load()` reads every ``TENANTFLEET_*`` environment variable and, when
``TENANTFLEET_CONFIG`` names one, a TOML file (environment wins over the file).
An unknown key in either place is an error that names it. This is the only module
that reads ``os.environ`` (a test checks).
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from router.errors import ConfigInvalid

PREFIX = "TENANTFLEET_"


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # where the servers are; empty means "start the embedded fleet"
    control_dsn: str = ""
    redis_url: str = ""
    shard_dsns: str = Field("", description="comma-separated shard DSNs registered by `up` on external servers")
    fleet_dir: Path = Path(".fleet")
    # where `plugins uninstall --policy export|purge` writes tenant exports when no
    # --export-dir is given, and the only place the admin API exports to and imports from
    export_dir: Path | None = None
    shards: int = Field(3, ge=1, le=64)

    # services
    bind_host: str = "127.0.0.1"
    router_port: int = Field(8300, ge=0, le=65535)
    host_port: int = Field(8400, ge=0, le=65535)
    # Bearer keys of the router service: the admin key may do anything (and the host's
    # /admin API); the read key may only read (resolve, list and get tenants and shards),
    # for the services that resolve tenants. Unset, the embedded fleet generates each into
    # <fleet_dir> (0600); with neither set nothing but health, metrics and OpenAPI is open.
    admin_key: str = ""
    read_key: str = ""
    # A console sign-in (the admin key exchanged for a session cookie) lasts this long.
    console_session_s: float = Field(8 * 3600.0, gt=0, le=30 * 86400)
    # A tenant staff member's app shell sign-in (their API key exchanged for a session cookie).
    app_session_s: float = Field(8 * 3600.0, gt=0, le=30 * 86400)
    # An idle connection, a request header that never completes, or a body that doesn't
    # arrive is cut after this many seconds (408 REQUEST_TIMEOUT for a body).
    http_timeout_s: float = Field(15.0, gt=0, le=3600)

    # pools
    control_pool_min: int = Field(1, ge=0)
    control_pool_max: int = Field(10, ge=1)
    shard_pool_min: int = Field(0, ge=0)
    shard_pool_max: int = Field(10, ge=1)
    # a host closes and replaces a shard connection once it has served more than this many
    # distinct tenants (0: never), which bounds each backend's catalog cache (host/leases.py)
    pool_recycle_tenants: int = Field(1000, ge=0)
    connect_timeout_s: float = Field(5.0, gt=0)

    # resolve cache
    cache_size: int = Field(100_000, ge=1)
    cache_ttl_s: float = Field(60.0, gt=0)
    redis_ttl_s: int = Field(300, ge=1)
    redis_namespace: str = Field("tf", pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    negative_ttl_s: float = Field(5.0, gt=0)

    # plugins
    killed_plugins: str = ""

    # migrations
    lock_timeout_ms: int = Field(2000, ge=1)
    statement_timeout_ms: int = Field(0, ge=0)
    batch_size: int = Field(50, ge=1)
    shard_concurrency: int = Field(4, ge=1)
    backoff_max_s: float = Field(30.0, gt=0)
    probe_slow_ms: float = Field(500.0, gt=0)
    # the SLO throttle of migrations and moves (shard_migrations/slo_throttle.py): a shard
    # whose request p95 (published by the hosts) nears its limit gets fewer concurrent
    # operations, down to none, and more again when there is room. The limit: this p95 in ms
    # when set, else the shard's p95 when the run starts times the ratio; or an SLO file's
    # (p95_ms and p95_ratio_to_steady). A paused shard gets one slot back after max_pause_s.
    slo_throttle: bool = True
    slo_throttle_p95_ms: float = Field(0.0, ge=0)
    slo_throttle_ratio: float = Field(1.25, gt=1, le=100)
    slo_throttle_file: str = ""
    slo_throttle_max_pause_s: float = Field(30.0, ge=0, le=3600)
    # slow start: a run begins each shard that serves requests (the hosts publish its p95)
    # at this many operations per second, doubling every second the p95 stays low, unpaced
    # past 32x; 0 starts at full speed (the throttle then acts from its first reading on)
    slo_throttle_start_rate: float = Field(10.0, ge=0, le=10000)
    # the same for drains and rebalances: a move costs ~10x a tenant's migration in CPU
    # (~60 ms over the servers and the mover against ~5), so its start is 10x slower
    slo_throttle_move_start_rate: float = Field(1.0, ge=0, le=10000)
    # the CPU priority (Unix nice, 0-19; 0: unchanged) of migrations: the CLI process running
    # one and its PostgreSQL backends when they run on this machine (router/background.py),
    # so the request path gets the CPU first (moves only as `move_idle` below says)
    operation_nice: int = Field(10, ge=0, le=19)
    # and, on Linux, the SCHED_IDLE policy for the same processes: they run only on a CPU
    # nothing else wants and are preempted at once by any other task (a nice value alone
    # still lets an operation finish its slice before a woken request runs); false: nice only
    operation_idle: bool = True
    # moves (drain, rebalance) yield the CPU the same way (their CLI process and their
    # backends) when the machine has CPU to spare as they start (1-minute load average below
    # the CPU count): a fenced copy or cutover then still finds an idle CPU at once; on a
    # busier machine, or false, they keep normal priority (a starved cutover is a longer pause)
    move_idle: bool = True
    # how long a shard (or one tenant) may keep failing before the run reports it and moves on
    shard_give_up_s: float = Field(120.0, gt=0)
    # how long a run keeps coming back to a tenant a move holds before it reports that
    # tenant's unit failed (a move may take longer than shard_give_up_s)
    migrate_move_wait_s: float = Field(3600.0, gt=0)

    # tenant moves
    # how long a cutover may hold the tenant's writes for the final catch-up before it
    # lets go, lets the target catch up unfenced and tries again (writes are never blocked
    # for long); doubled on each attempt, so a busy target still gets there
    cutover_timeout_ms: int = Field(50, ge=1, le=60_000)
    # how long a cutover waits for the tenant's in-flight transactions to finish before it
    # lets go and tries again (new transactions queue behind it meanwhile: writes wait at
    # most this plus cutover_timeout_ms per attempt); doubled on each attempt
    cutover_lock_wait_ms: int = Field(50, ge=1, le=60_000)
    cutover_attempts: int = Field(7, ge=1, le=20)
    # how long a move waits for the subscription to catch up before the cutover
    catchup_timeout_s: float = Field(600.0, gt=0)
    # how long a move waits for a migration in flight on the tenant before refusing
    move_hold_wait_ms: int = Field(10_000, ge=1)
    # concurrent moves: overall, per source and per target shard (PostgreSQL's logical
    # replication workers and slots are few)
    moves_concurrency: int = Field(4, ge=1, le=64)
    moves_per_shard: int = Field(2, ge=1, le=32)
    # drains and rebalances in `auto` mode move a tenant this small offline: copying it
    # under the fence (tens of ms) holds its writes less than an online move's set-up
    # costs everyone (a replication slot waits for every running transaction on the source)
    move_offline_max_bytes: int = Field(2 * 1024 * 1024, ge=0)
    # how long a moved tenant's old schema is kept on the source before `gc` drops it
    retired_grace_s: float = Field(86_400.0, ge=0)

    # request path
    fence_retries: int = Field(3, ge=0)
    fence_wait_ms: int = Field(5000, ge=1)
    # a tenant whose fence stays ahead of the directory this long has a move whose mover
    # stopped past its commit point: the host switches the directory itself (keep it
    # under fence_wait_ms; a cutover's directory update normally follows in milliseconds)
    move_finish_after_ms: int = Field(1000, ge=1)
    # a host closes its connections and pool to a shard no tenant transaction of its own
    # started on for this long (e.g. drained), or at once to one set offline or removed
    idle_shard_close_s: float = Field(60.0, gt=0)
    max_body_bytes: int = Field(1_048_576, ge=1)

    log_level: str = "INFO"

    @property
    def shard_dsn_list(self) -> list[str]:
        return [d.strip() for d in self.shard_dsns.split(",") if d.strip()]

    @property
    def killed_plugin_set(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.killed_plugins.split(",") if p.strip())

    @property
    def is_external(self) -> bool:
        return bool(self.control_dsn)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Build settings from the TOML file, the environment, then ``overrides``.

        Raises ConfigInvalid naming the bad key or value.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        config_path = env.get(PREFIX + "CONFIG")
        if config_path:
            try:
                with open(config_path, "rb") as fh:
                    file_values = tomllib.load(fh)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigInvalid(f"cannot read {PREFIX}CONFIG={config_path}: {exc}", key="CONFIG") from exc
            for key, value in file_values.items():
                _check_key(key, f"{config_path}")
                values[key] = value
        for name, value in env.items():
            if not name.startswith(PREFIX) or name == PREFIX + "CONFIG" or name.startswith(PREFIX + "TEST_"):
                continue
            key = name[len(PREFIX):].lower()
            _check_key(key, "environment")
            values[key] = value
        values.update(overrides)
        try:
            settings = cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            raise ConfigInvalid(f"bad setting {PREFIX}{key.upper()}: {first['msg']}", key=key) from exc
        settings.check_keys()
        return settings

    def check_keys(self) -> None:
        """CONFIG_INVALID if the read key is the admin key: a read key given to the services
        that resolve tenants would then change anything (checked by `load` and again when
        the embedded fleet's key files fill them in, `router.runtime.effective_settings`)."""
        if self.read_key and self.read_key == self.admin_key:
            raise ConfigInvalid(f"{PREFIX}READ_KEY is the admin key: the read key must be a key of its own "
                                f"(it is given to services that may only read)", key="read_key")


def _check_key(key: str, where: str) -> None:
    if key not in Settings.model_fields:
        raise ConfigInvalid(f"unknown setting {PREFIX}{key.upper()} in {where}", key=key)


def test_environment() -> dict[str, str]:
    """The ``TENANTFLEET_TEST_*`` variables the test suite reads (external servers)."""
    return {k[len(PREFIX) + 5:].lower(): v for k, v in os.environ.items() if k.startswith(PREFIX + "TEST_")}
