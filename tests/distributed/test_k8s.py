"""`tuneforge k8s render`: a ConfigMap + Kubeflow PyTorchJob, checked against the operator's CRD
envelope (vendored, trimmed) and the Kubernetes core/v1 schemas (kubernetes-validate, offline)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.distributed.conftest import cli, dist_spec

SCHEMA = Path(__file__).parent / "schemas" / "pytorchjob-kubeflow-v1.json"
K8S_VERSION = "1.30"


def _render(tmp_path, tiny_models, dist_data, *extra) -> tuple[list[dict], str]:
    spec = dist_spec(tiny_models["llama"], dist_data, "runs/k8s-job", distributed={"strategy": "zero3"}, world=2)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = cli("k8s", "render", str(path), *extra, timeout=120)
    assert r.returncode == 0, r.stderr
    return list(yaml.safe_load_all(r.stdout)), r.stdout


def test_manifest_validates_and_runs_the_same_launcher(tmp_path, tiny_models, dist_data):
    jsonschema = pytest.importorskip("jsonschema")
    kv = pytest.importorskip("kubernetes_validate")
    docs, text = _render(tmp_path, tiny_models, dist_data, "--nodes", "3", "--gpus-per-node", "8", "--image",
                         "registry.example/tuneforge:1", "--volume-claim", "shared-data", "--namespace", "ml")
    config_map, job = docs
    kv.validate(config_map, K8S_VERSION, strict=True)
    jsonschema.validate(job, json.loads(SCHEMA.read_text()))
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    for r in replicas.values():
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": r["template"]},
                    K8S_VERSION, strict=True)
    pod = replicas["Worker"]["template"]["spec"]
    command = pod["containers"][0]["command"][-1]
    assert "tuneforge train /etc/tuneforge/job.yaml --nnodes 3 --nproc 8" in command
    assert '--node-rank "$RANK"' in command and '--master-addr "$MASTER_ADDR"' in command
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert "&id" not in text  # plain YAML, no anchors
    # the spec inside is a valid tuneforge spec for 3 nodes x 8 ranks on CUDA
    from tuneforge.spec import build_spec

    inner = build_spec(yaml.safe_load(config_map["data"]["job.yaml"]))
    assert (inner.distributed.nnodes, inner.distributed.nproc, inner.distributed.strategy, inner.device) == (
        3, 8, "zero3", "cuda")


def test_schema_catches_a_broken_manifest():
    jsonschema = pytest.importorskip("jsonschema")
    bad = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "x"},
           "spec": {"pytorchReplicaSpecs": {"Chief": {"replicas": 1}}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json.loads(SCHEMA.read_text()))


def test_bad_arguments_are_one_line(tmp_path, tiny_models, dist_data):
    spec = dist_spec(tiny_models["llama"], dist_data, "runs/x")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = cli("k8s", "render", str(path), "--nodes", "2", "--gpus-per-node", "-1", "--image", "i", "--name", "Bad_Name",
            timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--gpus-per-node" in r.stderr and "--name" in r.stderr
    r = cli("k8s", "render", str(path), "--nodes", "2", "--gpus-per-node", "1", "--image", "bad image!",
            "--namespace", "Team_A", "--volume-claim", "my claim", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert all(flag in r.stderr for flag in ("--image: 'bad image!'", "--namespace: 'Team_A'", "--volume-claim"))


@pytest.mark.parametrize("image", ["tuneforge", "tuneforge:0.1", "registry.example:5000/team/tuneforge:0.1-cpu",
                                   "ghcr.io/org/tune_forge@sha256:" + "a" * 64, "localhost/x__y.z-w:Latest"])
def test_image_references_are_accepted(image):
    from tuneforge.distributed.k8s import _IMAGE

    assert _IMAGE.match(image)


@pytest.mark.parametrize("image", ["Tuneforge", "x:", "x::1", "-x", "x y", "x/", "x:tag@sha256:12"])
def test_malformed_image_references_are_refused(image):
    from tuneforge.distributed.k8s import _IMAGE

    assert not _IMAGE.match(image)
