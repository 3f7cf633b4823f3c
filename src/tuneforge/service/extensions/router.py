"""HTTP layer of tuneforge's own endpoints beside OpenAI's: the planner's verdict on a job request, and a job's
resolved spec. Authenticated and scoped to the key's org like the rest of the API."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from tuneforge.service.auth import Org, current_org
from tuneforge.service.errors import error_responses
from tuneforge.service.extensions import job_specs, plans
from tuneforge.service.extensions.protocol import JobSpecAnswer, Plan, PlanRequest

router = APIRouter(prefix="/v1/tuneforge", tags=["tuneforge"])
OrgDep = Annotated[Org, Depends(current_org)]


@router.post("/plan", response_model=Plan, summary="The planner's verdict on a fine-tuning job request",
             description="Send the body of a `POST /v1/fine_tuning/jobs` request: the answer says whether that job "
                         "fits this server's machine (predicted peak memory with its uncertainty) and how long a step "
                         "and the run take, for the job's method only (`tuneforge.method`, lora unless set), and "
                         "what the engine's validator finds in its files. A request shape is planned once and then "
                         "answered from a cache. Planning a shape never probed before can take minutes: after "
                         "`wait` seconds the answer is 202 with `status: running` and the planner's `progress`; "
                         "send the same request again.",
             responses={202: {"model": Plan, "description": "Still planning: send the same request again"},
                        **error_responses(400, 401, 404, 429)})
async def plan(request: Request, body: PlanRequest, org: OrgDep,
               wait: Annotated[float, Query(ge=0, le=60, description="Seconds to wait for the verdict.")] = 20):
    state = request.app.state
    entry, cached = await run_in_threadpool(plans.start, state.ctx, plans.planner_of(state), org, body)
    await plans.wait(entry, wait)
    status, answer = plans.answer(entry, cached)
    return JSONResponse(answer.model_dump(mode="json"), status_code=status,
                        headers={"Retry-After": "1"} if status == 202 else None)


@router.get("/jobs/{job_id}/spec", response_model=JobSpecAnswer, summary="A fine-tuning job's resolved spec",
            responses=error_responses(401, 404))
def job_spec(request: Request, org: OrgDep,
             job_id: Annotated[str, Path(description="The fine-tuning job's ID.", examples=["ftjob-abc123"])]):
    return job_specs.public_spec(request.app.state.ctx, org, job_id)
