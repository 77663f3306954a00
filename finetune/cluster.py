"""Facts about the Ray cluster the driver runs on, and where the driver's helper actors live."""

from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node["Alive"])


def on_driver_node() -> NodeAffinitySchedulingStrategy:
    """Scheduling that keeps a run's bookkeeping actor (progress, skipped rows) beside the driver.
    Placed on a worker node, it would die with that node and take the run with it, where the
    workers alone would have restarted (Ray pins its Train controller the same way)."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
