from __future__ import annotations

import pytest

from quorum.runtime.errors import InvalidRequest, NoModulesAvailable
from quorum.runtime.plan import drop_count, make_plan

ORDER = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
ALL = frozenset(range(10))


def test_budget_takes_a_prefix_of_the_anytime_order():
    plan = make_plan(ORDER, ALL, 10, budget=4)
    assert plan.selected == [3, 1, 4, 0] and plan.requested == 4 and plan.dropped == []


def test_no_budget_takes_every_available_module():
    plan = make_plan(ORDER, ALL - {4}, 10)
    assert plan.selected == [m for m in ORDER if m != 4] and plan.requested == 10


def test_unhealthy_modules_are_skipped_in_order():
    assert make_plan(ORDER, ALL - {3, 4}, 10, budget=3).selected == [1, 0, 5]


def test_fewer_available_than_budget_uses_them_all():
    plan = make_plan(ORDER, frozenset({9, 2}), 10, budget=5)
    assert plan.selected == [9, 2] and plan.requested == 5


@pytest.mark.parametrize("budget", [0, -1, 11])
def test_budget_out_of_range(budget):
    with pytest.raises(InvalidRequest, match=r"1\.\.10"):
        make_plan(ORDER, ALL, 10, budget=budget)


def test_drop_fraction_is_seeded_and_excluded():
    a = make_plan(ORDER, ALL, 10, budget=10, drop=0.3, seed=7)
    b = make_plan(ORDER, ALL, 10, budget=10, drop=0.3, seed=7)
    assert a == b and len(a.dropped) == 3
    assert not set(a.dropped) & set(a.selected)
    assert a.selected == [m for m in ORDER if m not in a.dropped]


def test_drop_count_then_budget():
    plan = make_plan(ORDER, ALL, 10, budget=2, drop=5, seed=0)
    remaining = [m for m in ORDER if m not in plan.dropped]
    assert len(plan.dropped) == 5 and plan.selected == remaining[:2]


def test_drop_counts_and_fractions():
    assert drop_count(0.0, 10) == 0 and drop_count(0.99, 10) == 9 and drop_count(0.25, 256) == 64
    assert drop_count(3, 10) == 3


@pytest.mark.parametrize("drop", [1.0, 1.5, -0.1, float("nan"), 10, -1, True, "0.5"])
def test_bad_drop_values(drop):
    with pytest.raises(InvalidRequest):
        make_plan(ORDER, ALL, 10, drop=drop)


def test_nothing_available():
    with pytest.raises(NoModulesAvailable):
        make_plan(ORDER, frozenset(), 10)
