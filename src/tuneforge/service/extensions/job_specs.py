"""A job's resolved JobSpec as its owner may see it (`GET /v1/tuneforge/jobs/{id}/spec`): every default the
engine filled in, with the server's paths replaced by the names the client knows."""
from __future__ import annotations

import copy

from tuneforge.service.auth import Org
from tuneforge.service.context import ServiceContext
from tuneforge.service.errors import NotFound, without_server_paths
from tuneforge.service.extensions.protocol import JobSpecAnswer


def public_spec(ctx: ServiceContext, org: Org, job_id: str) -> JobSpecAnswer:
    row = ctx.store.get_job(job_id, org.id)
    if row is None:
        raise NotFound("fine-tuning job", job_id, param="fine_tuning_job_id")
    spec = copy.deepcopy(row["spec"])
    spec.pop("output_dir", None)  # the service's own folder
    known = {spec.get("model") or "": row["model"]}
    spec["model"] = row["model"]
    data = spec.get("data") or {}
    for param, key in (("training_file", "train"), ("validation_file", "validation")):
        if data.get(key):
            known[data[key]] = row[param]
            data[key] = row[param]
    return JobSpecAnswer(fine_tuning_job_id=job_id, spec=without_paths_in(spec, known))


def without_paths_in(value, known: dict[str, str]):
    if isinstance(value, str):
        return without_server_paths(value, known)
    if isinstance(value, dict):
        return {k: without_paths_in(v, known) for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths_in(v, known) for v in value]
    return value
