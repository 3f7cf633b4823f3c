"""HTTP layer of the web dashboard: the pages (HTML shells) and their assets. Nothing here reads an org's data:
each page's script asks the public API for it with the key the user entered."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from tuneforge.service.errors import NotFound
from tuneforge.service.web import pages

router = APIRouter(include_in_schema=False)


def _page(name: str, **values: str) -> HTMLResponse:
    return HTMLResponse(pages.render(name, **values), headers={**pages.SECURITY_HEADERS, "Cache-Control": "no-cache"})


@router.get("/")
def jobs_page():
    return _page("jobs")


@router.get("/jobs/{job_id}")
def job_page(job_id: str):
    return _page("job", job_id=job_id)


@router.get("/models")
def models_page():
    return _page("models")


@router.get("/playground")
def playground_page():
    return _page("playground")


@router.get("/assets/{name:path}")
def asset(name: str, request: Request):
    found = pages.assets().get(name)
    if found is None:
        raise NotFound("asset", name)
    headers = {**pages.SECURITY_HEADERS, "ETag": found.etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == found.etag:
        return Response(status_code=304, headers=headers)
    return Response(found.body, media_type=found.media_type, headers=headers)
