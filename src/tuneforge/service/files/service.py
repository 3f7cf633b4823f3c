"""Files: uploads stored under DATA_DIR/files/<file id>.jsonl (the uploaded name is only shown back, never
a path), listed per org, deleted unless an unfinished job still reads them."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import BinaryIO

from tuneforge.service.auth import Org
from tuneforge.service.context import ServiceContext
from tuneforge.service.errors import Conflict, InvalidRequest, NotFound, TooLarge
from tuneforge.service.files.protocol import FileDeleted, FileList, FileObject, file_object
from tuneforge.service.idempotency import idempotent
from tuneforge.service.storage.store import now, storable_text

CHUNK = 1 << 20
MAX_FILENAME = 512


def file_path(ctx: ServiceContext, file_id: str) -> Path:
    return ctx.settings.files_dir / f"{file_id}.jsonl"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _check_jsonl(path: Path) -> str | None:
    """None if every non-blank line is a JSON object, else what is wrong and where."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
            except UnicodeDecodeError:
                return f"line {number}: not UTF-8 text"
            except (ValueError, RecursionError) as e:
                return f"line {number}: invalid JSON ({str(e).split(':')[0]})"
            if not isinstance(rec, dict):
                return f"line {number}: expected a JSON object per line"
    return None


def upload(ctx: ServiceContext, org: Org, *, filename: str, purpose: str, source: BinaryIO,
           idempotency_key: str | None) -> tuple[int, dict]:
    if purpose != "fine-tune":
        raise InvalidRequest(f"purpose: this server stores fine-tuning data only; use purpose='fine-tune' "
                             f"(got {purpose!r})", param="purpose")
    file_id = new_id("file")
    tmp = ctx.settings.files_dir / f".tmp-{file_id}"
    sha = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as out:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                if size > ctx.settings.max_upload_bytes:
                    raise TooLarge(f"file: larger than this server's limit of {ctx.settings.max_upload_bytes} bytes",
                                   param="file", code="file_too_large")
                sha.update(chunk)
                out.write(chunk)
        shown_name = storable_text(filename or "upload.jsonl")[:MAX_FILENAME]
        request_hash = hashlib.sha256(f"{purpose}\0{shown_name}\0{sha.hexdigest()}".encode()).hexdigest()

        def store_it():
            if size == 0:
                raise InvalidRequest("file: the file is empty; upload JSONL, one training example per line",
                                     param="file", code="invalid_file")
            problem = _check_jsonl(tmp)
            if problem:
                raise InvalidRequest(f"file: {shown_name} is not valid JSONL: {problem}", param="file",
                                     code="invalid_file_format")
            os.replace(tmp, file_path(ctx, file_id))
            row = {"id": file_id, "org_id": org.id, "filename": shown_name, "purpose": purpose, "bytes": size,
                   "created_at": now(), "status": "processed", "status_details": None, "job_id": None}
            ctx.store.insert_file(row)
            return 200, file_object(row)

        return idempotent(ctx.store, org.id, "POST /v1/files", idempotency_key, request_hash, store_it)
    finally:
        tmp.unlink(missing_ok=True)


def add_result_file(ctx: ServiceContext, org_id: str, job_id: str, filename: str, content: bytes) -> str:
    """The results file of a job, owned by the job's org. Its id follows from the job's, so writing it
    again (a worker that crashed after writing it) makes no second file; a job's other result files (its
    before/after report) are told apart by their names."""
    key = f"results\0{job_id}" + ("" if filename == "step_metrics.csv" else f"\0{filename}")
    file_id = "file-" + hashlib.sha256(key.encode()).hexdigest()[:24]
    path = file_path(ctx, file_id)
    tmp = path.with_name(f".tmp-{file_id}")
    tmp.write_bytes(content)
    os.replace(tmp, path)
    ctx.store.insert_file_once({"id": file_id, "org_id": org_id, "filename": filename, "purpose": "fine-tune-results",
                                "bytes": len(content), "created_at": now(), "status": "processed",
                                "status_details": None, "job_id": job_id})
    return file_id


def get(ctx: ServiceContext, org: Org, file_id: str) -> FileObject:
    row = ctx.store.get_file(org.id, file_id)
    if row is None:
        raise NotFound("File", file_id, param="file_id")
    return file_object(row)


def content_path(ctx: ServiceContext, org: Org, file_id: str) -> Path:
    get(ctx, org, file_id)
    path = file_path(ctx, file_id)
    if not path.is_file():
        raise NotFound("File content", file_id, param="file_id")
    return path


def list_files(ctx: ServiceContext, org: Org, *, purpose: str | None, limit: int, order: str,
               after: str | None) -> FileList:
    rows, has_more = ctx.store.list_files(org.id, purpose=purpose, limit=limit, order=order, after=after)
    if rows is None:
        raise InvalidRequest(f"after: no file {after} to list after", param="after")
    data = [file_object(r) for r in rows]
    return FileList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                    has_more=has_more)


def delete(ctx: ServiceContext, org: Org, file_id: str) -> FileDeleted:
    get(ctx, org, file_id)
    users = ctx.store.files_in_use(org.id, file_id)
    if users:
        raise Conflict(f"File {file_id} is read by unfinished fine-tuning job(s) {', '.join(users)}; cancel them or "
                       "wait for them to finish", param="file_id", code="file_in_use")
    if ctx.store.delete_file(org.id, file_id):
        file_path(ctx, file_id).unlink(missing_ok=True)
    return FileDeleted(id=file_id, deleted=True)

