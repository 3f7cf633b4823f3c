"""HTTP layer of the Models API."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request

from tuneforge.service.auth import Org, current_org
from tuneforge.service.errors import error_responses
from tuneforge.service.models import service
from tuneforge.service.models.protocol import Model, ModelDeleted, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])
OrgDep = Annotated[Org, Depends(current_org)]
# A model name may hold '/' (a base model named after its hub id, a job suffix): the path converter takes it.
ModelId = Annotated[str, Path(description="A base model's name or a fine-tuned model's ID.",
                              examples=["ft:smollm2-135m-instruct:acme:triage:abc12345"])]


@router.get("", response_model=ModelList, responses=error_responses(401))
def list_models(request: Request, org: OrgDep):
    return service.list_models(request.app.state.ctx, org)


@router.get("/{model_id:path}", response_model=Model, responses=error_responses(401, 404))
def retrieve(request: Request, model_id: ModelId, org: OrgDep):
    return service.get(request.app.state.ctx, org, model_id)


@router.delete("/{model_id:path}", response_model=ModelDeleted, responses=error_responses(400, 401, 404))
def delete(request: Request, model_id: ModelId, org: OrgDep):
    return service.delete(request.app.state.ctx, org, model_id)
