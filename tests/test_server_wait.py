"""The server needs no node count in advance: it waits for min-train-nodes
connected nodes, up to node-wait-timeout, then stops with one clear error."""

import pytest

from fedlora.server_app import TooFewNodes, wait_for_nodes


class FakeGrid:
    """Nodes connect one by one, one more at each poll."""

    def __init__(self, arriving: list[int]) -> None:
        self.arriving, self.polls = arriving, 0

    def get_node_ids(self):
        self.polls += 1
        return list(range(self.arriving[min(self.polls, len(self.arriving)) - 1]))


def test_waits_until_enough_nodes_connect_and_returns_how_many():
    grid = FakeGrid([0, 1, 3])
    assert wait_for_nodes(grid, needed=2, timeout=10, poll=0.001) == 3
    assert grid.polls == 3


def test_too_few_nodes_within_the_wait_is_one_error_naming_the_numbers():
    grid = FakeGrid([1])
    with pytest.raises(TooFewNodes) as e:
        wait_for_nodes(grid, needed=3, timeout=0.05, poll=0.01)
    msg = str(e.value)
    assert "1 node(s) connected" in msg and "min-train-nodes = 3" in msg and "node-wait-timeout = 0.05" in msg
