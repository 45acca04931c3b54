"""Which auction partitions a scorer replica reads: the ``membership()`` the Kafka loop
calls every few seconds, giving ``(r, n)``: read partitions p with p mod n = r.

The source is the Serve controller's view of the deployment — its replicas, their
states and their ranks — not the replica context: a change of ``num_replicas`` alone is
a lightweight update that does not reconfigure running replicas, so their context's
``world_size`` stays what it was at their start. The view is *settled* when every
replica of the deployment is RUNNING, there are ``target_num_replicas`` of them, and
their ranks are exactly 0..n-1; replica of rank r then owns p mod n = r. While the view
is not settled (replicas starting or stopping, or ranks with a hole after a scale-down:
the controller renumbers them once the deployment is healthy again) every replica keeps
what it reads.

Replicas read the view at different moments, so a change is handed over without any
partition ever read by two replicas: a replica gives up what it no longer owns at once,
and takes a partition new to it only after the new view has held for ``HANDOVER_S``,
longer than any other replica needs to see it and let go (a refresh of the loop, the
age of a view, a batch). Meanwhile it reads what it owns in both views (an intersection of two residue
classes is a residue class, or empty). A replica alone in the deployment takes its
share at once: no one can be holding it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from serve_app.kafka_loop import ASSIGNMENT_REFRESH_S

logger = logging.getLogger("ray.serve")

Share = tuple[int, int]  # (r, n): partitions p with p mod n = r
NOTHING: Share = (1, 1)  # no p has p mod 1 = 1
VIEW_REFRESH_S = 1.0
VIEW_STALE_S = 3.0  # an older view counts as not settled
HANDOVER_S = 2 * ASSIGNMENT_REFRESH_S + 1.0  # > one loop refresh + a stale view + a batch
CONTROLLER_TIMEOUT_S = 10.0


def intersection(a: Share, b: Share) -> Share:
    """The partitions in both residue classes (Chinese remainder theorem), as one class."""
    if NOTHING in (a, b):
        return NOTHING
    modulus = math.lcm(a[1], b[1])
    return next(((r, modulus) for r in range(modulus) if r % a[1] == a[0] and r % b[1] == b[0]), NOTHING)


def describe(share: Share) -> str:
    return "none" if share == NOTHING else f"p mod {share[1]} = {share[0]}"


class HandoverMembership:
    """``membership()`` for the Kafka loop over a source of settled views: ``view()``
    gives (this replica's rank, number of replicas), or None while not settled."""

    def __init__(self, view: Callable[[], Share | None], clock: Callable[[], float] = time.monotonic) -> None:
        self.view = view
        self.clock = clock
        self.share: Share = NOTHING  # what this replica owns, as of the last view it took
        self.reading: Share = NOTHING  # what it was last told to read
        self._pending: tuple[Share, float] | None = None  # a settled view not yet taken, first seen at

    def __call__(self) -> Share:
        view = self.view()
        if view is None or view == self.share:
            self._pending = None  # not settled: keep reading what it reads
            return self._read(self.share if view is not None else self.reading)
        if self._pending is None or self._pending[0] != view:
            self._pending = (view, self.clock())
        if view[1] == 1 or self.clock() - self._pending[1] >= HANDOVER_S:
            self.share, self._pending = view, None
            return self._read(view)
        return self._read(intersection(self.reading, view))

    def _read(self, share: Share) -> Share:
        if share != self.reading:
            logger.info("partition share: %s (was %s)", describe(share), describe(self.reading))
        self.reading = share
        return share


class ServeView:
    """The settled view of this replica's deployment, read from the Serve controller
    (its rank mapping and its deployment details) by a thread of its own every
    ``VIEW_REFRESH_S``, so that a slow controller never holds up the Kafka loop. A view
    that could not be read, or is older than ``VIEW_STALE_S``, counts as not settled."""

    def __init__(self) -> None:
        from ray import serve

        context = serve.get_replica_context()
        self.app_name = context.app_name
        self.deployment = context.deployment
        self.replica_id = context.replica_id.unique_id
        self._latest: tuple[Share | None, float] = (None, 0.0)  # view, when read
        threading.Thread(target=self._refresh, name="serve-view", daemon=True).start()

    def __call__(self) -> Share | None:
        view, read_at = self._latest
        return view if time.monotonic() - read_at <= VIEW_STALE_S else None

    def _refresh(self) -> None:
        while True:
            started = time.monotonic()
            self._latest = (self._read(), started)
            time.sleep(VIEW_REFRESH_S)

    def _read(self) -> Share | None:
        import ray
        from ray.serve._private.common import DeploymentID, ReplicaState
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        try:
            controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
            ranks, details = ray.get(
                [
                    controller._get_replica_ranks_mapping.remote(DeploymentID(name=self.deployment, app_name=self.app_name)),
                    controller.get_deployment_details.remote(self.app_name, self.deployment),
                ],
                timeout=CONTROLLER_TIMEOUT_S,
            )
        except Exception as error:  # the controller restarting, or busy: keep the current share
            logger.warning("could not read the deployment's replicas from the Serve controller: %r", error)
            return None
        running = {r.replica_id for r in details.replicas if r.state == ReplicaState.RUNNING}
        settled = (
            len(running) == len(details.replicas) == details.target_num_replicas
            and running == ranks.keys()
            and sorted(rank.rank for rank in ranks.values()) == list(range(len(ranks)))
        )
        if not settled or self.replica_id not in ranks:
            return None
        return ranks[self.replica_id].rank, len(ranks)
