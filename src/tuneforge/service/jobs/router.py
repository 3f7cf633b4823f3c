"""HTTP layer of the fine-tuning jobs API: parse, call jobs/service.py, shape the answer."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from tuneforge.service.auth import Org, current_org
from tuneforge.service.errors import error_responses
from tuneforge.service.jobs import service
from tuneforge.service.jobs.protocol import CheckpointList, EventList, Job, JobCreate, JobList

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
OrgDep = Annotated[Org, Depends(current_org)]
JobId = Annotated[str, Path(description="The fine-tuning job's ID.", examples=["ftjob-abc123"])]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255,
                                              description="A retry with the same key replays the first answer.")]


@router.post("", response_model=Job, responses=error_responses(400, 401, 409, 413, 422, 429))
async def create(request: Request, body: JobCreate, org: OrgDep, idempotency_key: IdempotencyKey = None):
    status, answer = await run_in_threadpool(service.create, request.app.state.ctx, org, body, idempotency_key)
    return JSONResponse(answer, status_code=status)


@router.get("", response_model=JobList, responses=error_responses(400, 401))
def list_jobs(request: Request, org: OrgDep, after: str | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20):
    # metadata[key]=value filters, as OpenAI's API takes them
    meta = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
            if k.startswith("metadata[") and k.endswith("]")}
    return service.list_jobs(request.app.state.ctx, org, after=after, limit=limit, metadata=meta)


@router.get("/{job_id}", response_model=Job, responses=error_responses(401, 404))
def retrieve(request: Request, job_id: JobId, org: OrgDep):
    return service.get(request.app.state.ctx, org, job_id)


@router.post("/{job_id}/cancel", response_model=Job, responses=error_responses(400, 401, 404))
def cancel(request: Request, job_id: JobId, org: OrgDep):
    return service.control(request.app.state.ctx, org, job_id, "cancel")


@router.post("/{job_id}/pause", response_model=Job, responses=error_responses(400, 401, 404))
def pause(request: Request, job_id: JobId, org: OrgDep):
    return service.control(request.app.state.ctx, org, job_id, "pause")


@router.post("/{job_id}/resume", response_model=Job, responses=error_responses(400, 401, 404))
def resume(request: Request, job_id: JobId, org: OrgDep):
    return service.control(request.app.state.ctx, org, job_id, "resume")


@router.get("/{job_id}/events", response_model=EventList, responses=error_responses(400, 401, 404))
def events(request: Request, job_id: JobId, org: OrgDep, after: str | None = None,
           limit: Annotated[int, Query(ge=1, le=1000)] = 20):
    return service.events(request.app.state.ctx, org, job_id, after=after, limit=limit)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, responses=error_responses(400, 401, 404))
def checkpoints(request: Request, job_id: JobId, org: OrgDep, after: str | None = None,
                limit: Annotated[int, Query(ge=1, le=100)] = 10):
    return service.checkpoints(request.app.state.ctx, org, job_id, after=after, limit=limit)
