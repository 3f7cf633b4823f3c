"""`tuneforge k8s render`: the same spec and launcher as a Kubeflow PyTorchJob.

Two documents: a ConfigMap holding the job spec (with its `distributed` section set for the
cluster), and a `kubeflow.org/v1` PyTorchJob with one Master and nodes-1 Workers. Each pod runs
`tuneforge train` with `--node-rank "$RANK" --master-addr "$MASTER_ADDR" --master-port
"$MASTER_PORT"` (the training operator sets those per pod), so each node's tuneforge starts its own
ranks through torch.distributed.run exactly as on a workstation. Apply with
`kubectl apply -f job.yaml` on a cluster running the Kubeflow training operator.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from tuneforge.errors import SpecError
from tuneforge.spec import JobSpec

SPEC_MOUNT = "/etc/tuneforge"
WORK_MOUNT = "/workspace"
OPERATOR_PORT_NAME = "pytorchjob-port"  # the port the training operator publishes as MASTER_PORT
OPERATOR_PORT = 23456
HEADER = "# tuneforge: "  # a rendered manifest's first line starts so; --overwrite replaces only such files
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# an image reference as the distribution project's grammar has it: [host[:port]/]path[:tag][@digest]
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_IMAGE = re.compile(rf"^{_DOMAIN}?{_PATH}(?::[\w][\w.-]{{0,127}})?(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{{32,}})?$")


def cluster_spec(spec: JobSpec, nodes: int, gpus_per_node: int) -> JobSpec:
    """The spec as each pod runs it: nnodes = nodes, nproc = GPUs per node (1 on CPU nodes)."""
    d = spec.distributed.model_dump() if spec.distributed else {}
    d.update(nnodes=nodes, nproc=max(1, gpus_per_node), node_rank=0)
    if d.get("strategy", "ddp") == "none":
        d["strategy"] = "ddp"
    data = spec.model_dump(mode="json")
    data["distributed"] = d
    data["device"] = "cuda" if gpus_per_node > 0 else "cpu"
    return JobSpec.model_validate(data)


def render_pytorchjob(spec: JobSpec, *, nodes: int, gpus_per_node: int, image: str, name: str,
                      namespace: str | None = None, volume_claim: str | None = None, resume: bool = False) -> str:
    """Multi-document YAML: ConfigMap `<name>-spec` + PyTorchJob `<name>`."""
    problems = []
    if nodes < 1:
        problems.append(f"--nodes: {nodes}; give 1 or more")
    if gpus_per_node < 0:
        problems.append(f"--gpus-per-node: {gpus_per_node}; give 0 (CPU nodes) or more")
    if not _DNS_LABEL.match(name) or len(name) > 50:
        problems.append(f"--name: {name!r} is not a Kubernetes name (lower-case letters, digits and '-', at most 50)")
    if not image.strip():
        problems.append("--image: give the container image that has tuneforge installed")
    elif not _IMAGE.match(image):
        problems.append(f"--image: {image!r} is not an image reference (e.g. registry.example:5000/team/tuneforge:0.1)")
    if namespace is not None and not _DNS_LABEL.match(namespace):
        problems.append(f"--namespace: {namespace!r} is not a Kubernetes namespace (lower-case letters, digits and '-')")
    if volume_claim is not None and not _DNS_SUBDOMAIN.match(volume_claim):
        problems.append(f"--volume-claim: {volume_claim!r} is not a PersistentVolumeClaim name "
                        "(lower-case letters, digits, '-' and '.')")
    if problems:
        raise SpecError("; ".join(problems))
    job = cluster_spec(spec, nodes, gpus_per_node)
    meta = {"name": name, **({"namespace": namespace} if namespace else {}),
            "labels": {"app.kubernetes.io/name": "tuneforge", "app.kubernetes.io/instance": name}}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {**meta, "name": f"{name}-spec"},
                  "data": {"job.yaml": job.to_yaml()}}
    d = job.distributed
    command = (f'exec tuneforge train {SPEC_MOUNT}/job.yaml --nnodes {d.nnodes} --nproc {d.nproc} '
               '--node-rank "$RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"'
               + (" --resume" if resume else ""))
    mounts = [{"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True}]
    volumes = [{"name": "spec", "configMap": {"name": f"{name}-spec"}}]
    if volume_claim:  # data, model and output_dir (relative paths) on a volume every node shares
        mounts.append({"name": "work", "mountPath": WORK_MOUNT})
        volumes.append({"name": "work", "persistentVolumeClaim": {"claimName": volume_claim}})
    container = {
        "name": "pytorch",  # the training operator finds its container by this name
        "image": image,
        "command": ["sh", "-c", command],
        "workingDir": WORK_MOUNT if volume_claim else "/",
        "ports": [{"name": OPERATOR_PORT_NAME, "containerPort": OPERATOR_PORT}],
        "env": [{"name": "OMP_NUM_THREADS", "value": "1"}] if gpus_per_node else [],
        "volumeMounts": mounts,
    }
    if gpus_per_node:
        container["resources"] = {"limits": {"nvidia.com/gpu": gpus_per_node}}
    template = {"metadata": {"labels": meta["labels"]}, "spec": {"containers": [container], "volumes": volumes}}
    replicas = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
    if nodes > 1:
        replicas["Worker"] = {"replicas": nodes - 1, "restartPolicy": "Never", "template": template}
    pytorch_job = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": meta,
                   "spec": {"runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 3},
                            "pytorchReplicaSpecs": replicas}}
    header = (f"{HEADER}{nodes} node(s) x {d.nproc} rank(s), strategy {d.strategy} ({d.backend}).\n"
              "# Apply: kubectl apply -f THIS_FILE   (needs the Kubeflow training operator). A failed pod fails\n"
              "# the job; render again with --resume to continue from the newest checkpoint (docs/distributed.md).\n")
    return header + yaml.dump_all([config_map, pytorch_job], Dumper=_ManifestDumper, sort_keys=False)


def write_manifest(out: Path, text: str, *, overwrite: bool = False) -> None:
    """Write the manifest to `out`; an existing file only with `overwrite`, and only one tuneforge rendered."""
    from tuneforge import files
    from tuneforge.errors import OutputError

    if out.is_dir() or out.is_symlink():
        raise OutputError(f"--out: {out} is a {'folder' if out.is_dir() else 'link'}; give the manifest's file path")
    if out.exists():
        try:
            ours = out.read_text(encoding="utf-8", errors="replace").startswith(HEADER)
        except OSError as e:
            raise OutputError(f"--out: cannot read {out}: {e.strerror}") from None
        if not ours:  # --overwrite would not help: say what does
            raise OutputError(f"--out: {out} exists and tuneforge did not render it (its first line is not "
                              f"'{HEADER.strip()} ...'); choose another file, or move or delete it yourself")
        if not overwrite:
            raise SpecError(f"--out: {out} exists (a manifest tuneforge rendered); pass --overwrite to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out: cannot create the folder {out.parent}: {e.strerror}") from None
    files.atomic_write_text(out, text)


class _ManifestDumper(yaml.SafeDumper):
    """Plain YAML for kubectl and for people: no anchors/aliases, multi-line text as `|` blocks."""

    def ignore_aliases(self, data) -> bool:
        return True


_ManifestDumper.add_representer(
    str, lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))
