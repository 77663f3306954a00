"""Checkpoint storage every node reaches: on a multi-node cluster, a path on one machine's own
disk would scatter a run's checkpoints over the nodes (Ray stops such a run at its first
checkpoint, minutes in); this refuses it before anything starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from finetune.config import ConfigError

# File systems that several machines mount at once; fuse.* covers s3fs, gcsfuse, mountpoint-s3, ...
NETWORK_FILE_SYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
                        "virtiofs", "9p", "efs"}  # fmt: skip


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
    """ConfigError when a run on `nodes` > 1 machines would keep checkpoints on one machine's disk."""
    if nodes <= 1 or declared_shared or is_uri(storage_path):
        return
    local = storage_path.removeprefix("file://")
    fstype = mount_type(local, mounts)
    if fstype in NETWORK_FILE_SYSTEMS or fstype.startswith("fuse."):
        return
    raise ConfigError([
        f"checkpoint.storage_path={storage_path} is on this machine's own disk ({fstype or 'unknown file system'}), "
        f"but the cluster has {nodes} nodes: every node writes checkpoints there. Use storage all nodes reach: "
        "a URI (s3://bucket/prefix, gs://bucket/prefix) or a shared file system (NFS, EFS, ...); if this path is "
        "a shared mount, set checkpoint.storage_is_shared=true"
    ])

