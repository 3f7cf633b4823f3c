"""Models: the base models this server fine-tunes (every org sees them) and each org's fine-tuned models."""
from __future__ import annotations

from tuneforge import files
from tuneforge.service.auth import Org
from tuneforge.service.context import ServiceContext
from tuneforge.service.errors import InvalidRequest, NotFound
from tuneforge.service.models.protocol import Model, ModelDeleted, ModelList
from tuneforge.serving.registry import operator_models
from tuneforge.training.run_dir import RunDir

BASE_OWNER = "tuneforge"


def _base(ctx: ServiceContext, name: str) -> Model:
    return Model(id=name, created=int(ctx.settings.data_dir.stat().st_mtime), owned_by=BASE_OWNER)


def list_models(ctx: ServiceContext, org: Org) -> ModelList:
    data = [_base(ctx, name) for name in (*ctx.settings.base_models, *operator_models(ctx.settings.adapters))]
    data += [Model(id=r["id"], created=r["created_at"], owned_by=org.name) for r in ctx.store.list_models(org.id)]
    return ModelList(data=data)


def get(ctx: ServiceContext, org: Org, model_id: str) -> Model:
    if model_id in ctx.settings.base_models or model_id in operator_models(ctx.settings.adapters):
        return _base(ctx, model_id)
    row = ctx.store.get_model(model_id, org.id)
    if row is not None:
        return Model(id=row["id"], created=row["created_at"], owned_by=org.name)
    ckpt = ctx.store.get_checkpoint_by_model(model_id, org.id)
    if ckpt is not None:
        return Model(id=model_id, created=ckpt["created_at"], owned_by=org.name)
    raise NotFound("model", model_id, param="model")


def delete(ctx: ServiceContext, org: Org, model_id: str) -> ModelDeleted:
    if model_id in ctx.settings.base_models or model_id in operator_models(ctx.settings.adapters):
        raise InvalidRequest(f"model {model_id} is served by this server's operator; only your fine-tuned models "
                             "can be deleted",
                             param="model", code="cannot_delete_base_model")
    row = ctx.store.get_model(model_id, org.id)
    if row is None:
        raise NotFound("model", model_id, param="model")
    if ctx.store.delete_model(model_id, org.id):
        run = RunDir(ctx.settings.jobs_dir / row["job_id"] / "run")
        for output in (run.adapter, run.model):
            if output.exists():
                files.remove_owned(output)  # the guard: only inside the run folder tuneforge made
        base = ctx.settings.jobs_dir / row["job_id"] / "base"  # a job on a fine-tuned model: its merged base
        if files.owner_of(base) == "merge":
            files.remove_owned(base)
    return ModelDeleted(id=model_id, deleted=True)
