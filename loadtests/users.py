"""Locust users acting like a tenant's staff: list, read, create and update inventory items,
fetch the manifest. Imports Locust (so gevent): load only in the Locust process.

Each user works for one tenant at a time, picked with a Zipf mix over the targets (the
first tenants get most of the traffic, as real fleets do), authenticates with that
tenant's key, and after `SESSION_TASKS` tasks picks again (a new member of staff). Only
relative paths are requested, so every request goes to the targets' URL.
"""
from __future__ import annotations

import bisect
import itertools
import random
import uuid
from typing import Any, ClassVar

from locust import FastHttpUser, constant_throughput, task

from loadtests.scenarios import SLOW_PREFIX

SESSION_TASKS = 20
ITEMS = "/api/plugins/inventory/items"


class Mix:
    """Tenants with Zipf weights (rank r gets 1 / r**s), picked by bisecting the cumulative sum."""

    def __init__(self, tenants: list[dict[str, Any]], s: float) -> None:
        self.tenants = tenants
        self.cum = list(itertools.accumulate(1.0 / (r ** s) for r in range(1, len(tenants) + 1)))

    def pick(self, rng: random.Random) -> dict[str, Any]:
        return self.tenants[bisect.bisect_left(self.cum, rng.random() * self.cum[-1])]


class TenantStaff(FastHttpUser):
    """One member of a tenant's staff. `configure` sets the mix and pace before users start."""

    mix: ClassVar[Mix | None] = None
    slow_shard: ClassVar[str | None] = None
    wait_time = constant_throughput(2.0)
    # FastHttpUser's defaults: one connection per user, failures for status >= 400
    network_timeout = 30.0
    connection_timeout = 10.0

    @classmethod
    def configure(cls, tenants: list[dict[str, Any]], *, zipf_s: float, rate_per_user: float,
                  slow_shard: str | None) -> None:
        cls.mix = Mix(tenants, zipf_s)
        cls.slow_shard = slow_shard
        cls.wait_time = constant_throughput(rate_per_user)

    def on_start(self) -> None:
        self.rng = random.Random()
        self._left = 0
        self._pick()

    def _pick(self) -> None:
        assert self.mix is not None, "TenantStaff.configure was not called"
        self.tenant = self.mix.pick(self.rng)
        self.headers = {"Authorization": f"Bearer {self.tenant['apiKey']}", "X-Tenant": self.tenant["code"]}
        self.prefix = SLOW_PREFIX if self.tenant["shardId"] == self.slow_shard else ""
        self._left = SESSION_TASKS

    def _next(self) -> None:
        self._left -= 1
        if self._left <= 0:
            self._pick()

    def _item(self) -> int:
        return self.rng.randint(1, int(self.tenant["items"]))

    @task(40)
    def list_items(self) -> None:
        self.client.get(f"{ITEMS}?limit=20", headers=self.headers, name=self.prefix + "/items")
        self._next()

    @task(30)
    def read_item(self) -> None:
        self.client.get(f"{ITEMS}/{self._item()}", headers=self.headers, name=self.prefix + "/items/{id}")
        self._next()

    @task(15)
    def update_item(self) -> None:
        self.client.request("PATCH", f"{ITEMS}/{self._item()}", headers=self.headers,
                            json={"qty": self.rng.randint(0, 1000)}, name=self.prefix + "/items/{id}")
        self._next()

    @task(5)
    def create_item(self) -> None:
        sku = "lt-" + uuid.uuid4().hex[:16]
        self.client.post(ITEMS, headers=self.headers, json={"sku": sku, "name": "Load test item", "qty": 1},
                         name=self.prefix + "/items")
        self._next()

    @task(10)
    def manifest(self) -> None:
        self.client.get("/api/manifest", headers=self.headers, name=self.prefix + "/manifest")
        self._next()


class PinnedWriter(FastHttpUser):
    """A user pinned to one tenant being moved (the `move` scenario): it only writes (PATCH an
    item) at ``rate`` per second, so the gaps between its acknowledged writes show the
    tenant's write pause at its cutover. Its requests are judged like everyone's (recorded
    under ``PATCH /items/{id}``); `context` names the tenant so the gate can keep the
    acknowledgement times per tenant. ``fixed_count`` is the number of tenants pinned."""

    tenants: ClassVar[list[dict[str, Any]]] = []
    fixed_count = 0
    wait_time = constant_throughput(20.0)
    network_timeout = 30.0
    connection_timeout = 10.0
    _next_index: ClassVar[int] = 0
    _stride: ClassVar[int] = 1

    @classmethod
    def configure(cls, tenants: list[dict[str, Any]], *, rate: float, offset: int = 0, stride: int = 1) -> None:
        """With W workers, worker w's k-th pinned user takes tenant w + k*W: Locust spreads
        the fixed count evenly over the workers, so every tenant gets its writer."""
        cls.tenants = tenants
        cls.fixed_count = len(tenants)
        cls.wait_time = constant_throughput(rate)
        cls._next_index = offset
        cls._stride = max(1, stride)

    def on_start(self) -> None:
        assert self.tenants, "PinnedWriter.configure was not called"
        cls = type(self)
        self.tenant = self.tenants[cls._next_index % len(self.tenants)]
        cls._next_index += cls._stride
        self.rng = random.Random()
        self.headers = {"Authorization": f"Bearer {self.tenant['apiKey']}", "X-Tenant": self.tenant["code"]}

    def context(self) -> dict[str, Any]:
        return {"pinned": self.tenant["code"]}

    @task
    def write(self) -> None:
        item = self.rng.randint(1, int(self.tenant["items"]))
        self.client.request("PATCH", f"{ITEMS}/{item}", headers=self.headers,
                            json={"qty": self.rng.randint(0, 1000)}, name="/items/{id}")
