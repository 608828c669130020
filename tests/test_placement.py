"""router.placement: targets, drain plans and rebalance plans (pure functions)."""
from __future__ import annotations

import pytest

from router.errors import NoShardAvailable, ShardNotFound, ValidationFailed
from router.placement import ShardLoad, TenantSize, check_target, choose_target, loads_after, plan_drain, plan_rebalance


def _loads(*spec: tuple[str, str, int, int]) -> list[ShardLoad]:
    return [ShardLoad(sid, state, cap, n) for sid, state, cap, n in spec]


def test_check_target_refuses_same_unknown_inactive_and_full_shards() -> None:
    src, ok = ShardLoad("s1", "active", 10, 5), ShardLoad("s2", "active", 10, 5)
    check_target(src, ok, "s2")  # fine
    with pytest.raises(ValidationFailed, match="already on shard s1"):
        check_target(src, src, "s1")
    with pytest.raises(ShardNotFound):
        check_target(src, None, "s9")
    for state in ("draining", "readonly", "offline"):
        with pytest.raises(NoShardAvailable, match=state):
            check_target(src, ShardLoad("s2", state, 10, 0), "s2")
    with pytest.raises(NoShardAvailable, match="full"):
        check_target(src, ShardLoad("s2", "active", 10, 10), "s2")


def test_choose_target_picks_the_least_loaded_active_shard_with_room() -> None:
    loads = _loads(("s1", "active", 10, 9), ("s2", "active", 100, 15), ("s3", "active", 10, 1),
                   ("s4", "draining", 10, 0))
    # relative to capacity after the move: s2 16/100 < s3 2/10 (s4 is empty but draining)
    assert choose_target(loads, exclude="s1").shard_id == "s2"
    assert choose_target(_loads(("s1", "active", 10, 9), ("s2", "active", 100, 30), ("s3", "active", 10, 1)),
                         exclude="s1").shard_id == "s3"
    with pytest.raises(NoShardAvailable):
        choose_target(_loads(("s1", "active", 1, 1), ("s2", "active", 1, 1)), exclude="s1")


def test_drain_plan_moves_every_tenant_evenly_and_largest_first() -> None:
    loads = _loads(("s1", "draining", 100, 6), ("s2", "active", 100, 0), ("s3", "active", 100, 0),
                   ("s4", "offline", 100, 0))
    tenants = [TenantSize(f"t{i}", "s1", bytes=100 * i) for i in range(6)] + [TenantSize("x", "s2", 50)]
    plan = plan_drain("s1", tenants, loads, by="bytes")
    assert sorted(m.tenant_id for m in plan) == [f"t{i}" for i in range(6)]
    assert {m.source for m in plan} == {"s1"} and {m.target for m in plan} <= {"s2", "s3"}
    assert plan[0].tenant_id == "t5"  # largest first
    after = loads_after(loads, plan)
    assert after["s1"].tenants == 0 and after["s4"].tenants == 0
    assert abs(after["s2"].bytes - after["s3"].bytes) <= 100
    by_count = plan_drain("s1", tenants, loads, by="count")
    counts = loads_after(loads, by_count)
    assert (counts["s2"].tenants, counts["s3"].tenants) == (3, 3)


def test_drain_plan_refuses_when_the_rest_cannot_hold_the_shard() -> None:
    loads = _loads(("s1", "draining", 10, 5), ("s2", "active", 4, 2), ("s3", "readonly", 100, 0))
    with pytest.raises(NoShardAvailable, match="no room"):
        plan_drain("s1", [TenantSize(f"t{i}", "s1") for i in range(5)], loads)


def test_rebalance_plan_brings_every_shard_within_tolerance_with_few_moves() -> None:
    loads = _loads(("s1", "active", 100, 30), ("s2", "active", 100, 0), ("s3", "active", 100, 0))
    tenants = [TenantSize(f"t{i}", "s1") for i in range(30)]
    plan = plan_rebalance(loads, tenants, by="count", tolerance=0.1)
    after = loads_after(loads, plan)
    assert all(9 <= after[s].tenants <= 11 for s in ("s1", "s2", "s3"))  # mean 10, within 10%
    assert len(plan) == 19  # the fewest: s1 must come down to 11
    assert len({m.tenant_id for m in plan}) == len(plan)
    # already even: nothing to do
    assert plan_rebalance(_loads(("s1", "active", 100, 10), ("s2", "active", 100, 10)),
                          [TenantSize(f"t{i}", "s1" if i < 10 else "s2") for i in range(20)]) == []


def test_rebalance_by_bytes_and_with_capacity_weights() -> None:
    loads = [ShardLoad("s1", "active", 100, 3, 900), ShardLoad("s2", "active", 100, 3, 100),
             ShardLoad("s3", "draining", 100, 1, 5000)]
    tenants = [TenantSize("a", "s1", 600), TenantSize("b", "s1", 200), TenantSize("c", "s1", 100),
               TenantSize("d", "s2", 50), TenantSize("e", "s2", 30), TenantSize("f", "s2", 20),
               TenantSize("g", "s3", 5000)]
    plan = plan_rebalance(loads, tenants, by="bytes", tolerance=0.5)
    assert all(m.target != "s3" and m.source != "s3" for m in plan)  # only active shards take part
    after = loads_after(loads, plan)
    assert abs(after["s1"].bytes - after["s2"].bytes) < 900 - 100
    # a shard twice the capacity ends up with about twice the tenants
    weighted = _loads(("big", "active", 200, 0), ("small", "active", 100, 30))
    after = loads_after(weighted, plan_rebalance(weighted, [TenantSize(f"t{i}", "small") for i in range(30)],
                                                 tolerance=0.1))
    assert 18 <= after["big"].tenants <= 22 and 9 <= after["small"].tenants <= 11  # 0.1 per capacity, +-10%
    assert after["big"].tenants + after["small"].tenants == 30


@pytest.mark.parametrize("kwargs, match", [({"by": "rows"}, "by must be"), ({"tolerance": 1.5}, "tolerance"),
                                           ({"tolerance": -0.1}, "tolerance")])
def test_rebalance_refuses_bad_options(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValidationFailed, match=match):
        plan_rebalance(_loads(("s1", "active", 10, 1)), [], **kwargs)  # type: ignore[arg-type]
