"""What `tuneforge serve` reads of an ONNX export folder (export.json) before it loads anything: whether a
folder is an export, whether it may be served, and the model names it serves. It imports no torch, so the API
process lists exports without loading an inference stack; only `check_export` (at `tuneforge serve --adapter`)
asks ONNX Runtime GenAI to read the folder's config."""
from __future__ import annotations

import json
from pathlib import Path

from tuneforge.errors import ModelError

SERVED_FORMATS = ("onnx", "onnx-adapters")


def is_export(folder: Path) -> bool:
    """Whether `folder` is an export of `tuneforge export` (it holds export.json)."""
    return (Path(folder) / "export.json").is_file()


def read_export(folder: Path) -> dict:
    """export.json of an ONNX export that can be served; ModelError (one line, the fix) otherwise."""
    folder = Path(folder)
    try:
        record = json.loads((folder / "export.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder / 'export.json'} is unreadable ({e}); export again with `tuneforge export onnx`") \
            from None
    kind = record.get("format") if isinstance(record, dict) else None
    if kind not in SERVED_FORMATS:
        raise ModelError(f"{folder} is a {kind or 'unknown'} export; tuneforge serves ONNX exports "
                         "(`tuneforge export onnx`) and PyTorch runs")
    if not (folder / "genai_config.json").is_file():
        raise ModelError(f"{folder} has no genai_config.json: not a complete ONNX export")
    if kind == "onnx" and not record.get("passed"):
        raise ModelError(f"{folder} failed its export gates (kept with --keep-failed); do not serve it")
    if kind == "onnx-adapters":
        adapters = record.get("adapters") or {}
        failed = sorted(n for n, a in adapters.items() if not a.get("passed"))
        if failed:
            raise ModelError(f"{folder}: adapter(s) {', '.join(failed)} failed their export gates; export them again "
                             "(or to another folder) before serving it")
        missing = sorted(n for n, a in adapters.items() if not (folder / a.get("file", "")).is_file())
        if missing:
            raise ModelError(f"{folder}: the file of adapter(s) {', '.join(missing)} is missing")
    return record


def check_export(folder: Path) -> dict:
    """Everything about `folder` that can be checked before the first request: export.json, the adapter
    files, ONNX Runtime GenAI installed and genai_config.json readable by it."""
    from tuneforge.export.onnx import require_runtime

    record = read_export(folder)
    require_runtime()
    import onnxruntime_genai as og

    try:
        og.Config(str(folder))
    except Exception as e:  # noqa: BLE001 — GenAI raises plain RuntimeErrors
        raise ModelError(f"{folder}: ONNX Runtime GenAI cannot read its genai_config.json: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return record


def served_names(name: str, folder: Path) -> dict[str, str | None]:
    """Model names `--adapter NAME=EXPORT` serves -> the adapter inside the export (None: a merged export).
    An adapters export serves NAME:ADAPTER for each adapter that passed its gates, NAME:base the base."""
    record = read_export(folder)
    if record["format"] == "onnx":
        return {name: None}
    return {f"{name}:{adapter}": adapter for adapter, a in record["adapters"].items() if a.get("passed")}
