"""The partition handover between scorer replicas (serve_app/membership.py), driven
through scale events with a fake controller view and a fake clock: at no moment do two
replicas read one partition, and once a view has held long enough every partition is
read by exactly one replica."""

from __future__ import annotations

import itertools

import pytest

from serve_app.membership import HANDOVER_S, NOTHING, HandoverMembership, intersection

PARTITIONS = range(12)


def partitions(share: tuple[int, int]) -> set[int]:
    return {p for p in PARTITIONS if p % share[1] == share[0]}


def test_intersection_is_the_partitions_in_both_classes() -> None:
    for a, b in itertools.product([(r, n) for n in (1, 2, 3, 4) for r in range(n)] + [NOTHING], repeat=2):
        assert partitions(intersection(a, b)) == partitions(a) & partitions(b), (a, b)


class Cluster:
    """Replicas (name -> membership) over one controller view that the test changes;
    each replica polls at its own moments."""

    def __init__(self) -> None:
        self.now = 0.0
        self.views: dict[str, tuple[int, int] | None] = {}
        self.replicas: dict[str, HandoverMembership] = {}
        self.reading: dict[str, set[int]] = {}

    def add(self, name: str) -> None:
        self.views[name] = None
        self.replicas[name] = HandoverMembership(lambda: self.views[name], clock=lambda: self.now)
        self.reading[name] = set()

    def remove(self, name: str) -> None:
        del self.views[name], self.replicas[name], self.reading[name]

    def settle(self, ranks: dict[str, int]) -> None:
        for name in self.views:
            self.views[name] = (ranks[name], len(ranks)) if name in ranks else None

    def unsettle(self) -> None:
        self.settle({})

    def poll(self, name: str) -> None:
        self.reading[name] = partitions(self.replicas[name]())
        owners = [n for n in self.reading for p in self.reading[n]]
        assert len(owners) == len(set(p for n in self.reading for p in self.reading[n])), self.reading

    def run(self, seconds: float, order: list[str]) -> None:
        """Each replica polls once a second, in the given order, for ``seconds``."""
        for _ in range(int(seconds)):
            self.now += 1.0
            for name in order:
                if name in self.replicas:
                    self.poll(name)

    def owners(self) -> dict[int, list[str]]:
        return {p: sorted(n for n in self.reading if p in self.reading[n]) for p in PARTITIONS}


@pytest.mark.parametrize("order", [["a", "b", "c"], ["c", "b", "a"]])
def test_scaling_1_2_3_2_hands_every_partition_over_without_overlap(order: list[str]) -> None:
    cluster = Cluster()
    cluster.add("a")
    cluster.settle({"a": 0})
    cluster.run(1, order)  # alone: takes everything at once
    assert cluster.owners() == {p: ["a"] for p in PARTITIONS}
    cluster.add("b")  # starting: not settled, a keeps all
    cluster.unsettle()
    cluster.run(3, order)
    assert cluster.owners() == {p: ["a"] for p in PARTITIONS}
    cluster.settle({"a": 0, "b": 1})  # b running
    cluster.run(HANDOVER_S + 2, order)
    assert cluster.owners() == {p: ["a" if p % 2 == 0 else "b"] for p in PARTITIONS}
    cluster.add("c")
    cluster.settle({"a": 0, "b": 1, "c": 2})
    cluster.run(HANDOVER_S + 2, order)
    assert cluster.owners() == {p: [["a", "b", "c"][p % 3]] for p in PARTITIONS}
    # scale down, removing rank 0: a stops (not settled), then a rank hole, then b, c renumbered
    cluster.unsettle()
    cluster.run(2, order)
    cluster.remove("a")
    cluster.run(2, order)
    assert {p for p, owners in cluster.owners().items() if not owners} == partitions((0, 3))  # a's, until settled
    cluster.settle({"b": 1, "c": 0})
    cluster.run(HANDOVER_S + 2, order)
    assert cluster.owners() == {p: ["c" if p % 2 == 0 else "b"] for p in PARTITIONS}


def test_a_new_view_is_taken_only_after_it_held_for_the_handover_time() -> None:
    cluster = Cluster()
    for name in ("a", "b"):
        cluster.add(name)
    cluster.settle({"a": 0, "b": 1})
    cluster.run(HANDOVER_S + 1, ["a", "b"])
    cluster.settle({"a": 1, "b": 0})  # ranks swapped: each must wait for the other to let go
    cluster.poll("a")
    assert cluster.reading["a"] == set()
    cluster.run(HANDOVER_S - 2, ["b", "a"])
    assert cluster.owners() == {p: [] for p in PARTITIONS}
    cluster.run(3, ["b", "a"])
    assert cluster.owners() == {p: ["b" if p % 2 == 0 else "a"] for p in PARTITIONS}
