"""HTTP layer of the Models API."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from tuneforge.service.auth import Org, current_org
from tuneforge.service.models import service
from tuneforge.service.models.protocol import Model, ModelDeleted, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])
OrgDep = Annotated[Org, Depends(current_org)]


@router.get("", response_model=ModelList)
def list_models(request: Request, org: OrgDep):
    return service.list_models(request.app.state.ctx, org)


@router.get("/{model_id:path}", response_model=Model)
def retrieve(request: Request, model_id: str, org: OrgDep):
    return service.get(request.app.state.ctx, org, model_id)


@router.delete("/{model_id:path}", response_model=ModelDeleted)
def delete(request: Request, model_id: str, org: OrgDep):
    return service.delete(request.app.state.ctx, org, model_id)
