"""Facts about the Ray cluster the driver runs on, and where the driver's helper actors live."""

from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node["Alive"])


def on_driver_node() -> NodeAffinitySchedulingStrategy:
    """Scheduling that keeps a run's bookkeeping actor (progress, skipped rows) beside the driver.
    Placed on a worker node, it would die with that node and take the run with it, where the
    workers alone would have restarted (Ray pins its Train controller the same way)."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def data_cpus_warning(reserved: float) -> str | None:
    """Ray Data runs each read and preprocessing task on one whole CPU: workers (and a sweep's
    trial actors) that reserve all but less than one of the cluster's CPUs leave it none, and
    the run waits forever unless a node joins. A warning, not a refusal: an autoscaler may add one."""
    total = ray.cluster_resources().get("CPU", 0.0)
    if reserved <= total < reserved + 1:
        return (f"workers reserve {reserved:g} of the cluster's {total:g} CPUs, leaving less than the one CPU each "
                "Ray Data task needs: the run will wait until a node joins. Lower scaling.cpus_per_worker or "
                "scaling.num_workers (or tune.max_concurrent_trials)")  # fmt: skip
    return None


def warn_if_data_starved(reserved: float, console: Console) -> None:
    if warning := data_cpus_warning(reserved):
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
