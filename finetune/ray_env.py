"""Ray plumbing the driver side shares (`finetune train`, `tune`, `evaluate`): joining or
starting Ray, Ray Data's console noise, where the driver's helper actors live, and what the
cluster offers (nodes, CPUs for Ray Data, checkpoint storage every node reaches)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console

from finetune.config import ConfigError

# File systems that several machines mount at once; fuse.* covers s3fs, gcsfuse, mountpoint-s3, ...
NETWORK_FILE_SYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
                        "virtiofs", "9p", "efs"}  # fmt: skip


# A Ray started for one command serves only that command's run, so its Train controller polls
# the workers every 0.2 s rather than Ray's 2 s: a report that follows the last within a poll,
# the final test's and the end of the run each waited for one (a tiny model's run: 41 -> 33-38 s
# at 0.5 s, 15.8 -> 14.1 s from 0.5 to 0.2 s; docs/BENCHMARKS.md, "Ray Train's poll"). A poll is
# one small actor call per worker; one that misses its interval is only late, not a failure.
LOCAL_TRAIN_POLL_S = "0.2"


# What a Ray that `finetune` starts for a single run leaves out (ensure_ray), and why: between
# them their processes wake hundreds of times a second, each wake taking a core from the training
# step (docs/BENCHMARKS.md, "Who takes the cores"), and a single run reads nothing from them.
# - The dashboard's modules. Tune's trials need them (Ray Train's placement-group cleaner asks the
#   state API whether a stopped trial's controller is gone, or the trial keeps its CPUs), so sweeps
#   and auto's race still start the dashboard.
# - Ray Train's preemption watcher, an actor polling for node drains (on one machine there are none).
LEAN_LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
_started_lean = False  # this process started Ray without the dashboard


def ensure_ray(*, trials: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (a submitted job), else start an embedded local Ray.
    `trials`: the caller runs Tune trials (a sweep, auto's race), which need Ray's dashboard; a
    Ray this process started without it for an earlier call is restarted with it."""
    global _started_lean
    if ray.is_initialized():
        if not (trials and _started_lean):
            return
        ray.shutdown()
    local = not os.environ.get("RAY_ADDRESS")
    if local:
        # read by the controller's process, a child of the raylet this process starts
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", LOCAL_TRAIN_POLL_S)
        # A new local Ray turns token auth on and logs a WARNING saying so: nothing for the user
        # to act on (RAY_AUTH_MODE=disabled still opts out). Ray reads RAY_AUTH_MODE when imported,
        # so it cannot be set here instead.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Workers' own logs (model loading, Ray Train internals) stay in Ray's session folder;
    # the driver shows progress and errors. Worker exceptions still reach the driver.
    # (include_dashboard only matters where Ray starts here; joining a running Ray ignores it.)
    ray.init(log_to_driver=False, logging_level="WARNING", configure_logging=True,
             include_dashboard=None if trials else False)  # fmt: skip
    _started_lean = local and not trials
    if local and cluster_nodes() == 1:  # Ray Train passes these from the driver's environment
        for name, value in LEAN_LOCAL_ENV.items():
            os.environ.setdefault(name, value)


def quiet_ray_data() -> None:
    # The live progress bar replaces Ray Data's per-dataset bars and execution notices; a failed
    # read or task reaches the caller as its exception (a DataError: one line), so Ray Data's own
    # log of it (a stack trace asking for a Ray bug report) would only repeat it.
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # Blocks reach the training loop in a fixed order, so a seeded run repeats exactly on one
    # worker. (With several, Ray's streaming split hands blocks to whichever worker asks first.)
    context.execution_options.preserve_order = True


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node["Alive"])


def nodes_it_may_have(alive: int, cluster_config=None) -> int:
    """How many nodes the cluster may have while a run goes on: those alive now, or as many as
    its autoscaler may start (the node groups of the cluster config it publishes, as Ray Train
    reads them; a group without a limit counts as one more node at least)."""
    if cluster_config is None:
        return alive
    extra = sum(1 if group.max_count < 0 else group.max_count for group in cluster_config.node_group_configs)
    return max(alive, 1 + extra)


def cluster_nodes() -> int:
    """`nodes_it_may_have` of the connected cluster: a single head that will grow counts as many."""
    from ray._private.state import state  # the autoscaler's published config, as Ray Train and Data read it

    return nodes_it_may_have(alive_nodes(), state.get_cluster_config())


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


def mount_type(path: str | Path, mounts: str | None = None) -> str:
    """The file-system type of the mount holding `path` (Linux /proc/mounts; '' when unknown)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    target = os.path.realpath(path)
    best, fstype = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def check_shared_storage(storage_path: str, declared_shared: bool, nodes: int, mounts: str | None = None) -> None:
    """ConfigError when a run on `nodes` > 1 machines would keep checkpoints on one machine's disk:
    Ray would scatter the run's checkpoints over the nodes and stop it at its first checkpoint,
    minutes in; this refuses it before anything starts."""
    if nodes <= 1 or declared_shared or is_uri(storage_path):
        return
    local = storage_path.removeprefix("file://")
    fstype = mount_type(local, mounts)
    if fstype in NETWORK_FILE_SYSTEMS or fstype.startswith("fuse."):
        return
    raise ConfigError([
        f"checkpoint.storage_path={storage_path} is on this machine's own disk ({fstype or 'unknown file system'}), "
        f"but the cluster has (or can grow to) {nodes} nodes: every node writes checkpoints there. Use storage all nodes reach: "
        "a URI (s3://bucket/prefix, gs://bucket/prefix) or a shared file system (NFS, EFS, ...); if this path is "
        "a shared mount, set checkpoint.storage_is_shared=true"
    ])
