"""Cron jobs: specs parsed by croniter, one host per tick, per-tenant fan-out.

Each job's loop sleeps until its next tick (UTC), then races for the tick's Redis lock
(``SET NX`` with an expiry); the winner runs the job, the others skip it. The next tick
is computed from *now* after each run, so ticks missed while the host was busy or down
are dropped, never replayed in a burst.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Awaitable, Callable

import redis.asyncio as aioredis
from croniter import CroniterBadCronError, croniter  # type: ignore[import-untyped]
from redis.exceptions import RedisError

from host.events import TaskOwner
from host.keys import cron_lock_key
from host.metrics import HostMetrics
from plugins.api import CronRun
from router.errors import ValidationFailed

log = logging.getLogger("tenantfleet.host.cron")

CronJob = Callable[[CronRun], Awaitable[None]]
TenantsOf = Callable[[str], Awaitable[list[str]]]
LOCK_TTL_S = 3600


@dataclass(frozen=True)
class Job:
    plugin_id: str
    name: str
    spec: str
    fn: CronJob
    per_tenant: bool


def parse_spec(spec: str) -> str:
    """The spec if croniter accepts it (5 fields, or 6 with seconds); VALIDATION_FAILED."""
    if not isinstance(spec, str) or not croniter.is_valid(spec):
        raise ValidationFailed(f"not a cron spec: {spec!r}", field="spec")
    return spec


class Cron:
    def __init__(self, redis: aioredis.Redis, namespace: str, tasks: TaskOwner, metrics: HostMetrics,
                 tenants_of: TenantsOf) -> None:
        self._redis = redis
        self._ns = namespace
        self._tasks = tasks
        self._metrics = metrics
        self._tenants_of = tenants_of

    def start(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._tasks.spawn(self._loop(job), name=f"cron:{job.plugin_id}:{job.name}")

    async def _loop(self, job: Job) -> None:
        while True:
            now = datetime.now(timezone.utc)
            try:
                tick: datetime = croniter(job.spec, now).get_next(datetime)
            except CroniterBadCronError:
                log.error("cron job %s has a bad spec %r; not scheduled", job.name, job.spec,
                          extra={"pluginId": job.plugin_id})
                return
            await asyncio.sleep(max(0.0, (tick - datetime.now(timezone.utc)).total_seconds()))
            try:
                won = await self._redis.set(cron_lock_key(self._ns, f"{job.plugin_id}.{job.name}",
                                                          int(tick.timestamp())), b"1", nx=True, ex=LOCK_TTL_S)
            except (RedisError, OSError):
                log.warning("cron lock for %s unavailable; tick skipped", job.name, extra={"pluginId": job.plugin_id})
                continue
            if won:
                await self._run(job, tick)

    async def _run(self, job: Job, tick: datetime) -> None:
        self._metrics.cron_runs.labels(job.plugin_id, job.name).inc()
        targets: list[str | None] = [None]
        try:
            if job.per_tenant:
                targets = list(await self._tenants_of(job.plugin_id))
            for tenant_id in targets:
                try:
                    await job.fn(CronRun(job=job.name, scheduled=tick, tenant_id=tenant_id))
                except Exception:  # one tenant's failure doesn't skip the others
                    log.exception("cron job failed", extra={"pluginId": job.plugin_id, "job": job.name,
                                                            "tenantId": tenant_id})
        except Exception:
            log.exception("cron job could not list its tenants", extra={"pluginId": job.plugin_id, "job": job.name})
