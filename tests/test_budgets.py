"""Budgets: largest remainder, water-filling DBP (caps, redistribution, exact totals), SSP, order."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curation.select.budgets import (
    dbp_budgets,
    in_cluster_order,
    largest_remainder,
    n_keep_for,
    ssp_budgets,
    take_per_cluster,
    water_filling,
)


def test_n_keep_rounds_half_up():
    assert n_keep_for(0.5, 5) == 3  # Python's round(2.5) would give 2
    assert n_keep_for(0.5, 4) == 2
    assert n_keep_for(1.0, 7) == 7
    assert n_keep_for(0.0, 7) == 0
    with pytest.raises(ValueError, match="keep_fraction: got 1.5"):
        n_keep_for(1.5, 3)


def test_largest_remainder_hand_computed():
    # floors [1, 2, 1] = 4; one unit left; remainders .5 .5 0 -> tie broken by lower index.
    np.testing.assert_array_equal(largest_remainder([1.5, 2.5, 1.0], 5), [2, 2, 1])
    # floors [1, 0, 3] = 4, remainders .2 .7 .1: one unit goes to the .7
    out = largest_remainder([1.2, 0.7, 3.1], 5)
    np.testing.assert_array_equal(out, [1, 1, 3])
    out = largest_remainder([1.2, 0.7, 3.1], 6)  # asks for more than sum(x)=5: floors 4 + 2 units
    np.testing.assert_array_equal(out, [2, 1, 3])


def test_largest_remainder_respects_bounds_and_rejects_infeasible():
    out = largest_remainder([0.9, 0.9, 0.9], 3, lb=[0, 0, 0], ub=[1, 0, 5])
    assert out.sum() == 3 and out[1] == 0 and out[0] <= 1
    with pytest.raises(ValueError, match="total: got 7"):
        largest_remainder([1, 1], 7, lb=[0, 0], ub=[3, 3])


def test_water_filling_cap_hit_and_redistribution():
    # target [80, 10, 10]; cluster 0 capped at 10, the other 70 units split evenly.
    x = dbp_budgets(np.array([10, 100, 100]), np.array([0.8, 0.1, 0.1]), 100, balance=0.0)
    np.testing.assert_array_equal(x, [10, 45, 45])


def test_water_filling_lower_bounds():
    # m = floor(0.5 * 90 / 3) = 15; all weight on cluster 0: [90 + l, l, l] clipped to >= 15.
    x = dbp_budgets(np.array([100, 100, 100]), np.array([1.0, 0.0, 0.0]), 90, balance=0.5)
    np.testing.assert_array_equal(x, [60, 15, 15])
    # lb is capped by the cluster size: lb = min(15, 4) for the small cluster.
    x = dbp_budgets(np.array([100, 4, 100]), np.array([1.0, 0.0, 0.0]), 90, balance=0.5)
    np.testing.assert_array_equal(x, [71, 4, 15])


def test_water_filling_real_solution_is_kkt():
    t = np.array([3.0, 1.0, 7.5, 0.2])
    lb, ub = np.array([1, 1, 1, 1]), np.array([2, 10, 10, 10])
    x = water_filling(t, 12.0, lb, ub)
    assert abs(x.sum() - 12.0) < 1e-6
    lam = (x - t)[(x > lb) & (x < ub)]
    assert np.ptp(lam) < 1e-6  # one lambda for every unclipped entry


def test_dbp_errors():
    with pytest.raises(ValueError, match="n_keep: got 11"):
        dbp_budgets(np.array([5, 5]), np.array([0.5, 0.5]), 11)
    with pytest.raises(ValueError, match="weights: got shape"):
        dbp_budgets(np.array([5, 5]), np.array([1.0]), 3)


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 60), min_size=1, max_size=25),
    data=st.data(),
    balance=st.floats(0, 1),
)
def test_dbp_property_bounds_and_exact_total(sizes, data, balance):
    sizes = np.array(sizes)
    weights = np.array(data.draw(st.lists(st.floats(0, 50), min_size=len(sizes), max_size=len(sizes))))
    n_keep = data.draw(st.integers(0, int(sizes.sum())))
    x = dbp_budgets(sizes, weights, n_keep, balance=balance)
    lb = np.minimum(math.floor(balance * n_keep / len(sizes)), sizes)
    assert x.sum() == n_keep
    assert np.all(x >= lb) and np.all(x <= sizes)
    # Integer solution within one unit of the real water-filling solution.
    p = weights / weights.sum() if weights.sum() > 0 else np.full(len(sizes), 1 / len(sizes))
    real = water_filling(n_keep * p, n_keep, lb, sizes)
    assert np.all(np.abs(x - real) < 1 + 1e-6)


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, 100), min_size=1, max_size=30), f=st.floats(0, 1))
def test_ssp_property(sizes, f):
    sizes = np.array(sizes)
    n_keep = n_keep_for(f, int(sizes.sum()))
    x = ssp_budgets(sizes, n_keep)
    assert x.sum() == n_keep and np.all(x >= 0) and np.all(x <= sizes)
    if sizes.sum():
        assert np.all(np.abs(x - sizes * n_keep / sizes.sum()) < 1 + 1e-9)


def test_ssp_hand_computed():
    # 0.5 * [3, 3, 4] = [1.5, 1.5, 2] -> n_keep 5 -> one unit to the first .5 remainder.
    np.testing.assert_array_equal(ssp_budgets(np.array([3, 3, 4]), 5), [2, 1, 2])


def test_in_cluster_order_hard_easy_random_ties_by_uid():
    cid = np.array([1, 0, 0, 0, 1])
    cos = np.array([0.5, 0.9, 0.1, 0.9, 0.2], np.float32)
    uids = ["e", "b", "c", "a", "d"]
    # cluster 0: cos .1 (c), then the .9 tie broken by uid a < b; cluster 1: .2 (d), .5 (e)
    np.testing.assert_array_equal(in_cluster_order(cid, cos, uids, "hard"), [2, 3, 1, 4, 0])
    np.testing.assert_array_equal(in_cluster_order(cid, cos, uids, "easy"), [3, 1, 2, 0, 4])
    r1 = in_cluster_order(cid, cos, uids, "random", seed=3)
    assert sorted(r1[:3]) == [1, 2, 3] and sorted(r1[3:]) == [0, 4]
    np.testing.assert_array_equal(r1, in_cluster_order(cid, cos, uids, "random", seed=3))
    with pytest.raises(ValueError, match="order: got 'median'"):
        in_cluster_order(cid, cos, uids, "median")


def test_take_per_cluster():
    cid = np.array([1, 0, 0, 0, 1])
    order = np.array([2, 3, 1, 4, 0])
    kept, pos = take_per_cluster(order, cid, np.array([2, 1]))
    np.testing.assert_array_equal(kept, [2, 3, 4])
    np.testing.assert_array_equal(pos, [0, 1, 0])
    with pytest.raises(ValueError, match="budget above its cluster size"):
        take_per_cluster(order, cid, np.array([4, 1]))


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_in_cluster_order_of_sorted_compact_uids_equals_the_string_sort(data):
    """Pools read from the lake hold uids as sorted S32 bytes: the order then skips the uid
    column (a stable sort on cluster and score) and must equal the general path's order on
    the same uids as strings, ties (equal cos, -0.0 and 0.0) included."""
    n = data.draw(st.integers(1, 60))
    cid = np.array(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
    cos = np.array(data.draw(st.lists(st.sampled_from([-0.0, 0.0, 0.25, 0.5, 0.9]), min_size=n, max_size=n)), np.float32)
    from curation.ingest.ids import make_uid, uid_strings

    u = sorted({make_uid("d", "s", str(i)) for i in range(n)})
    compact = uid_strings(u)
    for order in ("hard", "easy", "random"):
        fast = in_cluster_order(cid, cos, compact, order, seed=1)
        general = in_cluster_order(cid, cos, list(u), order, seed=1)
        np.testing.assert_array_equal(fast, general)
