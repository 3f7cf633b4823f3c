"""Files API shapes, as the openai SDK's `FileObject`, `FileDeleted` and cursor pages define them."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

Purpose = Literal["fine-tune", "fine-tune-results"]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Purpose
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


def file_object(row: dict) -> FileObject:
    return FileObject(id=row["id"], bytes=row["bytes"], created_at=row["created_at"], filename=row["filename"],
                      purpose=row["purpose"], status=row["status"], status_details=row["status_details"])
