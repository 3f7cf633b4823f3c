"""HTTP layer of chat completions and completions (streamed as server-sent events, or whole)."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from tuneforge.service.auth import Org, current_org
from tuneforge.service.errors import error_responses
from tuneforge.service.completions import service
from tuneforge.service.completions.protocol import (ChatCompletion, ChatCompletionRequest, Completion,
                                                    CompletionRequest)

router = APIRouter(prefix="/v1", tags=["inference"])
OrgDep = Annotated[Org, Depends(current_org)]


STREAMED = {200: {"content": {"text/event-stream": {}}, "description": "The answer, or with stream=true "
                                                                       "server-sent events"}}


@router.post("/chat/completions", response_model=ChatCompletion,
             responses={**STREAMED, **error_responses(400, 401, 404, 413, 429)})
async def chat_completions(request: Request, body: ChatCompletionRequest, org: OrgDep):
    state = request.app.state
    return await service.chat(state.ctx, state.models, org, body, request)


@router.post("/completions", response_model=Completion, responses={**STREAMED, **error_responses(400, 401, 404, 413, 429)})
async def completions(request: Request, body: CompletionRequest, org: OrgDep):
    state = request.app.state
    return await service.complete(state.ctx, state.models, org, body, request)
