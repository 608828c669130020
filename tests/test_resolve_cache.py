"""The in-process resolve cache on its own: LRU, TTL, aliases, epoch guard, negative cache."""
from __future__ import annotations

import copy
import uuid

import pytest

from router.cache import TenantCache
from router.models import TenantRecord


class FakeClock:
    """A monotonic clock the test moves by hand, so TTLs are checked without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def record(code: str, *, epoch: int = 1, domains: tuple[str, ...] = (), tenant_id: str | None = None) -> TenantRecord:
    tid = tenant_id or str(uuid.uuid4())
    return TenantRecord(tenant_id=tid, code=code, schema="t_" + uuid.UUID(tid).hex, shard_id="shard1",
                        state="active", epoch=epoch, domains=domains)


def cache(clock: FakeClock, **kw: int) -> TenantCache:
    return TenantCache(kw.pop("max_size", 100), 60.0, 5.0, clock=clock, **kw)


def test_a_record_is_found_by_id_code_and_each_domain() -> None:
    c = cache(FakeClock())
    rec = record("acme", domains=("acme.example.com", "acme.test.io"))
    assert c.put(rec)
    assert c.get("id", rec.tenant_id) is rec
    assert c.get("code", "acme") is rec
    assert c.get("domain", "acme.example.com") is rec
    assert c.get("domain", "acme.test.io") is rec
    assert c.get("code", "other") is None


def test_dropping_a_tenant_by_id_drops_every_alias() -> None:
    c = cache(FakeClock())
    rec = record("acme", domains=("acme.example.com",))
    c.put(rec)
    assert c.drop(rec.tenant_id)
    assert c.get("id", rec.tenant_id) is None
    assert c.get("code", "acme") is None
    assert c.get("domain", "acme.example.com") is None
    assert not c.drop(rec.tenant_id)


def test_an_entry_expires_after_its_ttl() -> None:
    clock = FakeClock()
    c = cache(clock)
    rec = record("acme")
    c.put(rec)
    clock.advance(59.9)
    assert c.get("code", "acme") is rec
    clock.advance(0.2)
    assert c.get("code", "acme") is None
    assert c.get("id", rec.tenant_id) is None  # the expired entry went with its aliases
    assert len(c) == 0


def test_eviction_spares_a_recently_used_tenant_once_and_takes_aliases_with_the_evicted() -> None:
    c = cache(FakeClock(), max_size=3)
    a, b, d = record("a", domains=("a.example.com",)), record("b"), record("d")
    for r in (a, b, d):
        c.put(r)
    assert c.get("code", "a") is a  # a is used; b is the oldest unused entry
    c.put(record("e"))
    assert len(c) == 3 and c.evictions == 1
    assert c.get("code", "b") is None and c.get("id", b.tenant_id) is None
    assert c.get("domain", "a.example.com") is a
    for code in ("f", "g", "h", "i", "j", "k"):  # a is not used again: it ages out
        c.put(record(code))
    assert len(c) == 3
    assert c.get("domain", "a.example.com") is None and c.get("code", "a") is None
    assert c.get("id", a.tenant_id) is None


def test_the_cache_stays_bounded_when_every_entry_is_in_use() -> None:
    c = cache(FakeClock(), max_size=50)
    recs = [record(f"u{i}") for i in range(50)]
    for r in recs:
        c.put(r)
    for n in range(3):
        for r in recs:
            c.get("id", r.tenant_id)
        c.put(record(f"n{n}"))
        assert len(c) == 50


def test_an_expired_entry_gets_no_second_chance_over_a_live_one() -> None:
    """A hit's bit spares an entry once, but not an expired one: no get would ever serve
    it again, and keeping it would evict a live entry in its place."""
    clock = FakeClock()
    c = cache(clock, max_size=2)
    dead = record("dead")
    c.put(dead)
    assert c.get("code", "dead") is dead  # used
    clock.advance(61)  # and now expired, still held
    live, new = record("live"), record("new")
    c.put(live)
    c.put(new)  # one too many: the expired entry goes, not `live`
    assert c.get("code", "live") is live and c.get("code", "new") is new
    assert len(c) == 2 and c.evictions == 1


def test_an_older_epoch_never_replaces_a_newer_entry() -> None:
    c = cache(FakeClock())
    new = record("acme", epoch=5)
    old = new.replace(epoch=4, state="suspended")
    assert c.put(new)
    assert not c.put(old)
    assert c.get("code", "acme") is new
    same = new.replace(state="active")
    assert c.put(same)  # an equal epoch refreshes
    assert c.get("id", new.tenant_id) is same


def test_an_invalidation_drops_an_older_entry_and_refuses_its_epoch_afterwards() -> None:
    c = cache(FakeClock())
    v1 = record("acme", epoch=1, domains=("acme.example.com",))
    c.put(v1)
    assert c.invalidate(v1.tenant_id, 2, [("code", "acme"), ("domain", "acme.example.com")])
    assert c.get("code", "acme") is None and c.get("domain", "acme.example.com") is None
    assert c.is_stale(v1)
    assert not c.put(v1)  # a slow read of epoch 1 finishing now can't put it back
    assert c.get("id", v1.tenant_id) is None
    v2 = v1.replace(epoch=2)
    assert c.put(v2) and c.get("code", "acme") is v2


def test_an_invalidation_with_an_older_or_equal_epoch_keeps_the_entry() -> None:
    c = cache(FakeClock())
    v3 = record("acme", epoch=3)
    c.put(v3)
    assert not c.invalidate(v3.tenant_id, 2)
    assert not c.invalidate(v3.tenant_id, 3)
    assert c.get("code", "acme") is v3


def test_the_epoch_memory_is_bounded() -> None:
    c = cache(FakeClock(), max_size=10, epoch_memory=4)
    tids = [str(uuid.uuid4()) for _ in range(6)]
    for tid in tids:
        c.invalidate(tid, 7)
    assert [c.floor(t) for t in tids] == [0, 0, 7, 7, 7, 7]


def test_a_stale_drop_refuses_records_at_or_below_the_stale_epoch() -> None:
    c = cache(FakeClock())
    v4 = record("acme", epoch=4)
    c.put(v4)
    assert c.drop(v4.tenant_id, stale_epoch=4)
    assert not c.put(v4)
    assert c.put(v4.replace(epoch=5))


def test_a_name_that_moved_to_another_tenant_stops_answering_for_the_old_one() -> None:
    c = cache(FakeClock())
    old_owner = record("acme", domains=("shop.example.com",))
    c.put(old_owner)
    new_owner = record("acme2", domains=("shop.example.com",), epoch=2)
    c.invalidate(new_owner.tenant_id, 2, [("code", "acme2"), ("domain", "shop.example.com")])
    assert c.get("domain", "shop.example.com") is None
    assert c.get("code", "acme") is old_owner
    c.put(new_owner)
    assert c.get("domain", "shop.example.com") is new_owner
    c.drop(old_owner.tenant_id)  # dropping the old owner leaves the new owner's alias alone
    assert c.get("domain", "shop.example.com") is new_owner


def test_a_domain_removed_by_a_newer_epoch_no_longer_answers() -> None:
    c = cache(FakeClock())
    v1 = record("acme", domains=("a.example.com", "b.example.com"))
    c.put(v1)
    v2 = v1.replace(epoch=2, domains=("a.example.com",))
    c.put(v2)
    assert c.get("domain", "b.example.com") is None
    assert c.get("domain", "a.example.com") is v2


def test_unknown_names_are_remembered_for_the_negative_ttl_only() -> None:
    clock = FakeClock()
    c = cache(clock)
    c.put_negative("code", "nobody")
    assert c.is_negative("code", "nobody")
    assert not c.is_negative("domain", "nobody.example.com")
    clock.advance(5.01)
    assert not c.is_negative("code", "nobody")
    assert c.negative_count() == 0


def test_the_negative_cache_is_bounded() -> None:
    c = cache(FakeClock(), negative_max=3)
    for i in range(5):
        c.put_negative("code", f"n{i}")
    assert c.negative_count() == 3
    assert not c.is_negative("code", "n0") and c.is_negative("code", "n4")


def test_a_record_that_appears_clears_its_names_from_the_negative_cache() -> None:
    c = cache(FakeClock())
    rec = record("late", domains=("late.example.com",))
    c.put_negative("code", "late")
    c.put_negative("domain", "late.example.com")
    c.put(rec)
    assert not c.is_negative("code", "late") and not c.is_negative("domain", "late.example.com")
    c.put_negative("code", "later")
    c.invalidate(str(uuid.uuid4()), 1, [("code", "later")])
    assert not c.is_negative("code", "later")


def test_clear_forgets_entries_but_keeps_the_epoch_guard() -> None:
    c = cache(FakeClock())
    v2 = record("acme", epoch=2)
    c.put(v2)
    c.invalidate(v2.tenant_id, 3)
    c.put(record("other"))
    assert c.clear() == 1
    assert c.get("code", "other") is None
    assert not c.put(v2)


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(KeyError):
        cache(FakeClock()).get("schema", "t_x")



def test_a_tenant_put_again_is_not_evicted_by_its_old_place_in_the_queue() -> None:
    c = cache(FakeClock(), max_size=3)
    a, b, d = record("a"), record("b"), record("d")
    for r in (a, b, d):
        c.put(r)
    a2 = a.replace(epoch=2)
    assert c.put(a2)  # a's old entry is still first in the eviction queue, now stale
    c.put(record("e"))
    assert c.evictions == 1
    assert c.get("code", "a") is a2  # the stale item was skipped, not taken for a2
    assert c.get("code", "b") is None  # the oldest live entry went instead
    for i in range(500):  # drops and puts leave stale items; eviction still takes one per put
        c.drop(a2.tenant_id)
        c.put(a2)
    assert len(c) == 3 and c.get("code", "a") == a2 and c.evictions == 1  # a2 was held: a copy is
    c.put(record("f"))
    assert len(c) == 3 and c.evictions == 2 and c.get("code", "d") is None


def test_puts_close_together_share_an_expiry_that_is_never_late() -> None:
    clock = FakeClock()
    c = cache(clock)  # TTL 60 s: puts within 60 ms share the first one's expiry
    first, second = record("first"), record("second")
    c.put(first)
    clock.advance(0.05)
    c.put(second)
    clock.advance(59.9)  # 59.95 s after `first`, 59.9 s after `second`
    assert c.get("code", "second") is second
    clock.advance(0.06)  # 60.01 s after `first`: `second` went with it, 0.04 s early
    assert c.get("code", "first") is None and c.get("code", "second") is None
    late = record("late")
    c.put(late)  # a minute later: its own expiry, a full TTL
    clock.advance(59.99)
    assert c.get("code", "late") is late

def test_an_entry_put_after_the_ttl_is_lowered_is_never_late() -> None:
    """Sharing an expiry must never make an entry outlive its own TTL, whatever expiry the
    cache's current stamp has: here one put under a longer TTL (``ttl_s`` is a public
    attribute), the next under a shorter one."""
    clock = FakeClock()
    c = cache(clock)  # TTL 60 s
    c.put(record("before"))  # its stamp expires in 60 s
    c.ttl_s = 10.0
    after = record("after")
    c.put(after)  # within the quantum of that stamp's time, but it must expire in 10 s
    clock.advance(9.99)
    assert c.get("code", "after") is after
    clock.advance(0.02)
    assert c.get("code", "after") is None
    c.put(record("x"))
    clock.advance(0.02)  # past the new TTL's quantum (10 ms), within the old one's (60 ms)
    late = record("late")
    c.put(late)  # so its own expiry: sharing x's would make it 20 ms early
    clock.advance(9.99)
    assert c.get("code", "late") is late


def test_a_record_held_by_two_caches_is_two_entries() -> None:
    """The cache keeps its entry state (expiry, used bit) on the record it holds, so a
    record object some cache held already is copied: each cache's entry expires and ages
    on its own."""
    clock_a, clock_b = FakeClock(), FakeClock()
    a, b = cache(clock_a, max_size=2), cache(clock_b, max_size=2)
    rec = record("acme", domains=("acme.example.com",))
    assert a.put(rec) and b.put(rec)
    held_a, held_b = a.get("code", "acme"), b.get("code", "acme")
    assert held_a is rec and held_b == rec and held_b is not rec
    clock_a.advance(61)
    assert a.get("domain", "acme.example.com") is None
    assert b.get("domain", "acme.example.com") == rec  # b's entry has its own expiry
    assert a.put(rec) and len(a) == 1  # back in a (a copy: a held it before), with a fresh TTL
    # used bits are per entry: b's hits above spare b's entry once; a's new one is unused
    for c in (a, b):
        c.put(record("x"))
        c.put(record("y"))
    assert a.get("code", "acme") is None and a.evictions == 1
    assert b.get("code", "acme") == rec and b.get("code", "x") is None


def test_a_record_reads_and_compares_like_the_dataclass_it_was() -> None:
    tid = str(uuid.uuid4())
    one = TenantRecord(tid, "acme", "t_" + uuid.UUID(tid).hex, "shard1", "active", 3, ["acme.example.com"])
    assert one.domains == ("acme.example.com",) and one.schema == "t_" + uuid.UUID(tid).hex
    assert one.shard_id == "shard1" and one.state == "active" and one.other_schema is None
    assert one == record("acme", epoch=3, domains=("acme.example.com",), tenant_id=tid)
    assert hash(one) == hash(record("acme", epoch=3, domains=("acme.example.com",), tenant_id=tid))
    moved = one.replace(shard_id="shard2", epoch=4)
    assert (moved.shard_id, moved.epoch, moved.domains, moved.code) == ("shard2", 4, one.domains, "acme")
    assert moved != one and one.replace() == one
    other = one.replace(schema="t_" + "0" * 32, domains=("b.example.com", "a.example.com"))
    assert other.schema == other.other_schema == "t_" + "0" * 32 and other.domains == ("b.example.com", "a.example.com")
    assert one.replace(domains=()).domains == ()
    assert "domains=('acme.example.com',)" in repr(one) and "schema='t_" in repr(one)
    with pytest.raises(AttributeError):
        one.code = "other"
    with pytest.raises(TypeError):
        one.replace(colour="red")
    c = cache(FakeClock())
    c.put(one)
    assert copy.copy(one) == one and c.put(copy.deepcopy(one))  # copies carry no cache state


def test_a_single_domain_of_a_str_subclass_is_one_domain() -> None:
    """A record stores one domain as its string; a str subclass (what a library may hand
    out) is that one domain too: found by it, not by its characters or a part of it."""
    class Name(str):
        pass

    tid = str(uuid.uuid4())
    rec = TenantRecord(tid, "acme", "t_" + uuid.UUID(tid).hex, "shard1", "active", 1, [Name("acme.example.com")])
    assert rec.domains == ("acme.example.com",)
    assert rec.answers_domain("acme.example.com") and not rec.answers_domain("acme")
    assert rec == record("acme", domains=("acme.example.com",), tenant_id=tid)
    assert hash(rec) == hash(record("acme", domains=("acme.example.com",), tenant_id=tid))
    c = cache(FakeClock())
    assert c.put(rec)
    assert c.get("domain", "acme.example.com") is rec
    assert c.get("domain", "a") is None
    assert c.drop(tid) and c.get("domain", "acme.example.com") is None


# Bytes per cached tenant (tracemalloc, Python 3.11, one domain each). Two ways of
# counting, as bench/resolve.py prints them:
# - the bench's "memory per 10,000": 10,000 tenants whose id strings exist already (the
#   caller's), decoded from their Redis value: 403 B before the record held the entry
#   state (an entry object per tenant, a one-domain tuple, shard and state slots), 291 B
#   now; the aim is 300;
# - everything the cache keeps alive, ids decoded from their 16 bytes as the client does,
#   5,000 tenants: 488 B before, 376 B now (the id string is 85 of them).
# What remains per tenant at 10,000: the code and domain strings (63 + 77 B), the record
# (80 B), three index entries (62 B), the deque slot (8 B); see the README.
MAX_BYTES_PER_CACHED_TENANT = 300
MAX_BYTES_PER_CACHED_TENANT_WITH_ID = 390


def _bytes_per_cached_tenant(n: int, *, ids_counted: bool) -> float:
    import gc
    import sys
    import tracemalloc

    from router.redis_format import decode_record, encode_record

    payloads: list[tuple[str | bytes, bytes]] = []
    for i in range(n):
        tid = uuid.uuid4()
        code = f"bguard-{i:06d}"
        rec = TenantRecord(tenant_id=str(tid), code=code, schema="t_" + tid.hex, shard_id="shard1", state="active",
                           epoch=1, domains=(f"{code}.bench.example",))
        payloads.append((tid.bytes if ids_counted else rec.tenant_id, encode_record(rec)))
    decode_record(*payloads[0])  # interns the shard id and state once, outside the count
    sys.intern("shard1")
    gc.collect()
    tracemalloc.start()
    try:
        c = TenantCache(n, 3600.0, 5.0)
        for tid, raw in payloads:
            assert c.put(decode_record(tid, raw))
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(c) == n
    return held / n


def test_a_cached_tenant_costs_at_most_its_byte_budget() -> None:
    per_tenant = _bytes_per_cached_tenant(10_000, ids_counted=False)
    assert per_tenant <= MAX_BYTES_PER_CACHED_TENANT, f"{per_tenant:.0f} B per cached tenant"
    per_tenant = _bytes_per_cached_tenant(5_000, ids_counted=True)
    assert per_tenant <= MAX_BYTES_PER_CACHED_TENANT_WITH_ID, f"{per_tenant:.0f} B per cached tenant, id included"
