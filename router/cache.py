"""The in-process level of the resolve cache: bounded LRU with TTL, aliases, epoch guard.

`TenantCache` holds `TenantRecord`s keyed by tenant_id, with alias indexes for code and
domain that point at the same record, so dropping a tenant drops every name it is known
by. It never lets an older epoch replace a newer one: each entry carries its epoch, and
a bounded memory of the newest epoch heard about (from an invalidation or a stale fence)
outlives the entry, so a slow read that started before a change can't put the old record
back. Unknown names are remembered for a short TTL (the negative cache).

Recency is tracked the CLOCK way (second chance), an LRU approximation: a hit only sets
a bit on the entry (if it is clear), and eviction takes the oldest-inserted entry, unless
its bit is set and it has not expired, in which case the bit is cleared and the entry
goes to the back of the queue. Measured with 100,000 tenants, reordering an OrderedDict
on every hit (strict LRU) made a hit twice as slow (~480 vs ~245 ns), all of it memory
traffic.

Memory (issue 12, "costs that stay flat"; tests/test_resolve_cache.py guards the bytes
per cached tenant): the cache keeps one object per tenant, the record itself. The entry's
state (expiry time and used bit) is one slot of the record, ``_stamp``, pointing at a
`_Stamp` shared by every entry put within `EXPIRY_QUANTUM` of the TTL of each other (an
entry expires at most that much early, never late); a hit that finds the bit clear moves
the record to its stamp's "used" twin, so a burst of puts holds two stamps, not an entry
object and a float each. A record is adopted by the first cache it is put in; one that a
cache held before is copied, so a record object is never two entries. The indexes are
plain dicts keyed by the record's own id, code and domain strings, and the eviction order
is a deque of records beside them (an OrderedDict costs ~90 B per key against ~38 for a
dict and ~8 for a deque slot); records removed out of order stay in the deque as stale
items that eviction skips, and the deque is rebuilt without them when they outnumber the
live ones.

Pure Python, no I/O, not thread-safe (one event loop owns it). Kinds are the ones
`router.directory.normalise_query` returns: ``"id"``, ``"code"``, ``"domain"``; values
must already be canonical (validated), since a hit on a value is trusted as-is.
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Callable, Iterable

from router.models import TenantRecord

Clock = Callable[[], float]
Name = tuple[str, str]  # (kind, canonical value)


# Second chances given per eviction at most, so one put never walks the whole cache.
MAX_SECOND_CHANCES = 32
# Entries put within this fraction of the TTL of each other share one expiry (the later
# ones expire up to ttl_s * EXPIRY_QUANTUM early).
EXPIRY_QUANTUM = 1 / 1000


class _Stamp:
    """A cache entry's state, shared by the entries put close together: when they expire,
    and whether they were hit since they were put or given their last second chance.
    Stamps come in pairs of the same expiry, ``used`` False and True, each the other's
    ``twin``."""
    __slots__ = ("expires", "used", "twin")

    def __init__(self, expires: float, used: bool) -> None:
        self.expires = expires
        self.used = used
        self.twin: _Stamp = self

    @classmethod
    def pair(cls, expires: float) -> "_Stamp":
        """A new pair; returns its unused stamp."""
        fresh, used = cls(expires, False), cls(expires, True)
        fresh.twin, used.twin = used, fresh
        return fresh


# The record's cache slot, set past its frozen __setattr__ by the slot's own descriptor
# (a C call). Only this module writes it; None means no cache has held the record.
_set_stamp: Callable[[TenantRecord, _Stamp], None] = TenantRecord.__dict__["_stamp"].__set__


def names_of(rec: TenantRecord) -> list[Name]:
    """Every (kind, value) a record answers to."""
    return [("id", rec.tenant_id), ("code", rec.code), *(("domain", d) for d in rec.domains)]


class TenantCache:
    """Bounded (CLOCK-approximated LRU) cache of tenant records with TTL, alias names, an
    epoch guard and a negative cache.

    ``max_size`` bounds the tenants held (aliases ride on their tenant's entry);
    ``negative_max`` bounds remembered unknown names and ``epoch_memory`` the remembered
    newest epochs (both default to ``max_size``). ``clock`` is monotonic seconds.
    """

    def __init__(self, max_size: int, ttl_s: float, negative_ttl_s: float, *, negative_max: int | None = None,
                 epoch_memory: int | None = None, clock: Clock = time.monotonic) -> None:
        if max_size < 1 or ttl_s <= 0 or negative_ttl_s <= 0:
            raise ValueError("max_size must be >= 1 and both TTLs > 0")
        self.max_size = max_size
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.negative_max = negative_max or max_size
        self.epoch_memory = epoch_memory or max_size
        self._clock = clock
        self._entries: dict[str, TenantRecord] = {}  # tenant_id -> record
        self._queue: deque[TenantRecord] = deque()  # eviction order (CLOCK); may hold stale records
        self._fresh = _Stamp.pair(float("-inf"))  # the stamp new entries share, while it is recent enough
        self._codes: dict[str, TenantRecord] = {}
        self._domains: dict[str, TenantRecord] = {}
        self._index: dict[str, dict[str, TenantRecord]] = {"id": self._entries, "code": self._codes,
                                                      "domain": self._domains}
        self._negative: OrderedDict[Name, float] = OrderedDict()  # name -> expires
        self._floor: OrderedDict[str, int] = OrderedDict()  # tenant_id -> newest epoch known to exist
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    # --- positive entries -----------------------------------------------------------------
    def get(self, kind: str, value: str) -> TenantRecord | None:
        """The fresh record cached under this name, or None (absent or expired).

        Raises KeyError for a kind other than id, code or domain.
        """
        rec = self._index[kind].get(value)
        if rec is None:
            return None
        stamp = rec._stamp
        if stamp.expires <= self._clock():
            self._remove(rec)
            return None
        if not stamp.used:
            _set_stamp(rec, stamp.twin)
        return rec

    def put(self, rec: TenantRecord) -> bool:
        """Cache ``rec`` unless a newer epoch of that tenant is held or known to exist.

        Returns True if ``rec`` is now the cached record (an equal epoch refreshes the TTL):
        ``rec`` itself, or a copy if a cache held that object before. Either way the
        record's names stop being negative: the tenant exists.
        """
        self._clear_negative(names_of(rec))
        if rec.epoch < self.floor(rec.tenant_id):
            return False
        old = self._entries.get(rec.tenant_id)
        if old is not None:
            self._remove(old)
        if rec._stamp is not None:
            rec = TenantRecord(rec.tenant_id, rec.code, rec.schema, rec.shard_id, rec.state, rec.epoch, rec.domains)
        ttl = self.ttl_s
        now = self._clock()
        expires = now + ttl
        stamp = self._fresh
        # share only an expiry at most a quantum earlier than this entry's own, never a later
        # one (a stamp put under a longer TTL, ``ttl_s`` being a public attribute)
        if not 0.0 <= expires - stamp.expires < ttl * EXPIRY_QUANTUM:
            stamp = self._fresh = _Stamp.pair(expires)
        _set_stamp(rec, stamp)
        entries, queue = self._entries, self._queue
        entries[rec.tenant_id] = rec
        queue.append(rec)
        self._codes[rec.code] = rec
        domains = rec._domains
        if type(domains) is str:
            self._domains[domains] = rec
        else:
            for d in domains:
                self._domains[d] = rec
        chances = MAX_SECOND_CHANCES
        while len(entries) > self.max_size:
            victim = queue.popleft()
            tid = victim.tenant_id
            if entries.get(tid) is not victim:
                continue  # removed or replaced since it was queued
            stamp = victim._stamp
            if stamp.used and chances and stamp.expires > now:  # an expired one is dead weight
                _set_stamp(victim, stamp.twin)
                queue.append(victim)  # used since its last pass: back of the queue
                chances -= 1
                continue
            del entries[tid]
            self._unalias(victim)
            self.evictions += 1
        if len(queue) > 2 * len(entries) + 64:  # drop the stale items (amortised O(1) a put)
            self._queue = deque(r for r in queue if entries.get(r.tenant_id) is r)
        return True

    def floor(self, tenant_id: str) -> int:
        """The newest epoch this cache knows exists for the tenant (0 if none)."""
        rec = self._entries.get(tenant_id)
        held = rec.epoch if rec is not None else 0
        return max(held, self._floor.get(tenant_id, 0))

    def is_stale(self, rec: TenantRecord) -> bool:
        """True if a newer epoch of this tenant is known: don't serve or cache ``rec``."""
        return rec.epoch < self.floor(rec.tenant_id)

    def invalidate(self, tenant_id: str, epoch: int, names: Iterable[Name] = ()) -> bool:
        """Apply an invalidation: epoch ``epoch`` of the tenant now exists.

        Drops the tenant's entry (with all its aliases) if it is older than ``epoch``,
        remembers ``epoch`` so older records are refused, and forgets ``names`` (the
        tenant's current code and domains) both as unknown names and as aliases of some
        other entry. Returns True if an entry was dropped.
        """
        self._remember(tenant_id, epoch)
        names = list(names)
        self._clear_negative([("id", tenant_id), *names])
        for kind, value in names:
            other = self._index[kind].get(value)
            if other is not None and other.tenant_id != tenant_id:
                del self._index[kind][value]  # the name moved to this tenant
        rec = self._entries.get(tenant_id)
        if rec is not None and rec.epoch < epoch:
            self._remove(rec)
            return True
        return False

    def drop(self, tenant_id: str, *, stale_epoch: int | None = None) -> bool:
        """Forget the tenant's entry and aliases; True if there was one.

        With ``stale_epoch`` (an epoch found stale, e.g. by the shard fence) records at or
        below it are refused from then on, so a second level still holding it is skipped.
        """
        if stale_epoch is not None:
            self._remember(tenant_id, stale_epoch + 1)
        rec = self._entries.get(tenant_id)
        if rec is None:
            return False
        self._remove(rec)
        return True

    def clear(self) -> int:
        """Forget every positive entry (epoch memory and negatives stay); returns how many."""
        n = len(self._entries)
        self._entries.clear()
        self._queue.clear()
        self._codes.clear()
        self._domains.clear()
        return n

    # --- negative entries -----------------------------------------------------------------
    def is_negative(self, kind: str, value: str) -> bool:
        """True if this name was recently found not to exist."""
        expires = self._negative.get((kind, value))
        if expires is None:
            return False
        if expires <= self._clock():
            del self._negative[(kind, value)]
            return False
        return True

    def put_negative(self, kind: str, value: str) -> None:
        """Remember that no tenant has this name, for ``negative_ttl_s``."""
        key = (kind, value)
        self._negative[key] = self._clock() + self.negative_ttl_s
        self._negative.move_to_end(key)
        while len(self._negative) > self.negative_max:
            self._negative.popitem(last=False)

    def negative_count(self) -> int:
        return len(self._negative)

    # --- internals ------------------------------------------------------------------------
    def _remove(self, rec: TenantRecord) -> None:
        if self._entries.get(rec.tenant_id) is rec:
            del self._entries[rec.tenant_id]
        self._unalias(rec)

    def _unalias(self, rec: TenantRecord) -> None:
        # Only drop an alias that still points at this record: the name may have moved on.
        if self._codes.get(rec.code) is rec:
            del self._codes[rec.code]
        for d in rec.domains:
            if self._domains.get(d) is rec:
                del self._domains[d]

    def _remember(self, tenant_id: str, epoch: int) -> None:
        if epoch <= self._floor.get(tenant_id, 0):
            return
        self._floor[tenant_id] = epoch
        self._floor.move_to_end(tenant_id)
        while len(self._floor) > self.epoch_memory:
            self._floor.popitem(last=False)

    def _clear_negative(self, names: Iterable[Name]) -> None:
        for name in names:
            self._negative.pop(name, None)
