"""HTTP layer of the Files API: parse the request, call files/service.py, shape the answer."""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.datastructures import UploadFile
from starlette.concurrency import run_in_threadpool

from tuneforge.service.auth import Org, current_org
from tuneforge.service.errors import InvalidRequest, TooLarge, error_responses
from tuneforge.service.files import service
from tuneforge.service.files.protocol import FileDeleted, FileList, FileObject

router = APIRouter(prefix="/v1/files", tags=["files"])
MULTIPART_OVERHEAD = 64 * 1024
FileId = Annotated[str, Path(description="The file's ID, as the upload answered it.", examples=["file-abc123"])]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255,
                                              description="A retry with the same key replays the first answer.")]


@router.post("", response_model=FileObject, summary="Upload a JSONL training file (multipart: file, purpose)",
             responses=error_responses(400, 401, 409, 413, 422),
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["file", "purpose"],
                 "properties": {"file": {"type": "string", "format": "binary",
                                         "description": "JSONL, one training example (a JSON object) per line"},
                                "purpose": {"type": "string", "enum": ["fine-tune"]}}}}}}})
async def upload(request: Request, org: Annotated[Org, Depends(current_org)], idempotency_key: IdempotencyKey = None):
    ctx = request.app.state.ctx
    limit = ctx.settings.max_upload_bytes + MULTIPART_OVERHEAD
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"file: larger than this server's limit of {ctx.settings.max_upload_bytes} bytes",
                       param="file", code="file_too_large")
    received = 0

    async def receive():  # counts the body as it streams in, and stops reading once it is too large
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise TooLarge(f"file: larger than this server's limit of {ctx.settings.max_upload_bytes} bytes",
                               param="file", code="file_too_large")
        return message

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("send the file as multipart/form-data with fields `file` and `purpose`", param="file")
    form = await Request(request.scope, receive).form(max_files=1, max_fields=16)
    try:
        upload_file, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload_file, UploadFile):
            raise InvalidRequest("file: missing; send the JSONL file in the multipart field `file`", param="file")
        if not isinstance(purpose, str):
            raise InvalidRequest("purpose: missing; use purpose='fine-tune'", param="purpose")
        status, body = await run_in_threadpool(service.upload, ctx, org, filename=upload_file.filename or "",
                                               purpose=purpose, source=upload_file.file,
                                               idempotency_key=idempotency_key)
    finally:
        await form.close()
    return JSONResponse(body, status_code=status)


@router.get("", response_model=FileList, responses=error_responses(400, 401))
def list_files(request: Request, org: Annotated[Org, Depends(current_org)],
               purpose: str | None = None, limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
               order: Literal["asc", "desc"] = "desc", after: str | None = None):
    return service.list_files(request.app.state.ctx, org, purpose=purpose, limit=limit, order=order, after=after)


@router.get("/{file_id}", response_model=FileObject, responses=error_responses(401, 404))
def retrieve(request: Request, file_id: FileId, org: Annotated[Org, Depends(current_org)]):
    return service.get(request.app.state.ctx, org, file_id)


@router.delete("/{file_id}", response_model=FileDeleted, responses=error_responses(401, 404, 409))
def delete(request: Request, file_id: FileId, org: Annotated[Org, Depends(current_org)]):
    return service.delete(request.app.state.ctx, org, file_id)


@router.get("/{file_id}/content", response_class=FileResponse,
            responses={200: {"description": "The file's bytes", "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                **error_responses(401, 404)})
def content(request: Request, file_id: FileId, org: Annotated[Org, Depends(current_org)]):
    path = service.content_path(request.app.state.ctx, org, file_id)
    return FileResponse(path, media_type="application/octet-stream")
