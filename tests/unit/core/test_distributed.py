"""Sharding helpers in one process: the cost-balanced assignment of work items to ranks, and
`alone` blocks (a rank acting as the only process)."""

from __future__ import annotations

from unittest import mock

import pytest

from et_circuits.core import distributed


def test_assign_puts_the_costliest_items_on_the_least_loaded_rank():
    parts = distributed.assign([27, 30, 33, 30], 2)
    assert parts == [[0, 2], [1, 3]]  # 33 + 27 against 30 + 30
    assert sorted(i for part in parts for i in part) == [0, 1, 2, 3]


def test_assign_balances_better_than_round_robin():
    costs = [10, 1, 10, 1]
    loads = [sum(costs[i] for i in part) for part in distributed.assign(costs, 2)]
    assert loads == [11, 11]  # round robin: 20 and 2


def test_assign_shares_out_items_of_no_cost_round_robin():
    assert distributed.assign([0, 0, 0, 0, 0], 2) == [[0, 2, 4], [1, 3]]


@pytest.mark.parametrize("n_ranks", [1, 3, 8])
def test_assign_gives_every_item_to_exactly_one_rank(n_ranks):
    costs = [3.0, 0.5, 2.0, 2.0, 7.0]
    parts = distributed.assign(costs, n_ranks)
    assert len(parts) == n_ranks
    assert sorted(i for part in parts for i in part) == list(range(len(costs)))
    assert all(part == sorted(part) for part in parts)


def test_mine_without_costs_is_round_robin_and_with_costs_follows_assign():
    two, second = (
        mock.patch.object(distributed, "world", return_value=2),
        mock.patch.object(distributed, "rank", return_value=1),
    )
    with two, second:
        assert list(distributed.mine(5)) == [1, 3]
        assert list(distributed.mine(4, [27, 30, 33, 30])) == [1, 3]


def test_alone_makes_a_rank_the_only_writer_until_the_block_ends():
    fake = mock.Mock(get_world_size=mock.Mock(return_value=2), get_rank=mock.Mock(return_value=1))
    fake.is_initialized.return_value = True
    with mock.patch.object(distributed, "dist", fake):
        assert (distributed.world(), distributed.rank(), distributed.is_writer()) == (2, 1, False)
        with distributed.alone():
            assert (distributed.world(), distributed.rank(), distributed.is_writer()) == (1, 0, True)
            assert distributed.sharded_map(lambda x: x * 2, [1, 2, 3]) == [2, 4, 6]  # no exchange
        assert (distributed.world(), distributed.rank()) == (2, 1)
