"""Which loaded model answers a model name, loading each base once.

- A base model, and every LoRA adapter (plain or QLoRA-trained) of runs on that base, share one engine:
  one copy of the base weights; the adapters are rows' `adapter_names` (serving/adapters.py).
- A full fine-tune or a merged model (`tuneforge merge`) is its own engine.
- DoRA and IA3 adapters cannot join peft's mixed-adapter batches, so each is merged into a base copy of
  its own (its own engine; one more copy of the base in memory).
- Prompt-tuning adapters are refused: their virtual tokens do not fit a shared KV cache.
- An ONNX export (`tuneforge export onnx`, a folder with export.json) is its own OnnxEngine
  (serving/onnx_engine.py); an adapters export serves NAME:ADAPTER for each adapter in it, one engine for all.
`--adapter NAME=FOLDER` takes a tuneforge run, a merged model, a plain peft adapter folder (its
adapter_config.json names the base) or an ONNX export.
QLoRA adapters run on the full-precision base, as `tuneforge generate` runs them.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import ModelError
from tuneforge.serving.adapters import AdapterSource
from tuneforge.serving.base import Engine
from tuneforge.serving.exports import is_export, read_export, served_names
from tuneforge.training.run_dir import RunDir

MIXABLE = ("lora", "qlora")


@dataclass(frozen=True)
class Target:
    """What answers one model name."""

    engine_key: tuple  # which engine: ("base", folder) | ("own", folder) | ("merged", run folder) | ("onnx", export)
    model_dir: Path  # weights the engine loads (a base or a full model)
    adapter: str | None = None  # adapter name in that engine (None: the model itself)
    source: AdapterSource | None = None
    tokenizer_dir: Path | None = None  # whose chat template renders the messages (default: model_dir)
    merge_adapter: Path | None = None  # DoRA/IA3: merged into the engine's own copy


def operator_models(adapters: dict[str, str]) -> dict[str, tuple[Path, str | None]]:
    """The operator's `--adapter NAME=FOLDER` entries as served model names -> (folder, adapter inside an ONNX
    adapters export or None). Read on every call: adapters added to an export while serving appear at once."""
    served: dict[str, tuple[Path, str | None]] = {}
    for name, folder in adapters.items():
        folder = Path(folder)
        try:
            inside = served_names(name, folder) if is_export(folder) else {name: None}
        except ModelError:  # broken since the start (which checked it): answered as not servable
            inside = {name: None}
        served.update({served_name: (folder, adapter) for served_name, adapter in inside.items()})
    return served


def onnx_target(folder: Path, adapter: str | None) -> Target:
    """Target for an ONNX export: a merged one (adapter None), or `adapter` of an adapters export."""
    record = read_export(folder)
    if adapter is None:
        if record["format"] != "onnx":
            raise ModelError(f"{folder} is an adapters export: serve one of its adapters "
                             f"({', '.join(record['adapters'])})")
        return Target(("onnx", str(folder)), folder)
    entry = record.get("adapters", {}).get(adapter)
    if entry is None:
        raise ModelError(f"{folder} has no adapter {adapter}")
    return Target(("onnx", str(folder)), folder, adapter=adapter, source=AdapterSource(weights=folder / entry["file"]))


def run_target(run: Path, name: str, export_adapter: str | None = None) -> Target:
    """Target for a finished run folder (CLI-trained or a service job), a merged model folder, or an ONNX export
    (`export_adapter`: which adapter of an adapters export)."""
    from tuneforge.files import owner_of
    from tuneforge.models import resolve_model

    folder = Path(run)
    run = RunDir(folder)
    if is_export(folder):
        return onnx_target(folder, export_adapter)
    if owner_of(folder) == "merge" or ((folder / "config.json").is_file() and not run.is_run):
        return Target(("own", str(folder)), folder)
    if (folder / "adapter_config.json").is_file():  # a plain peft adapter folder, from any trainer
        return _peft_folder_target(folder, name)
    if not run.is_run:
        raise ModelError(f"{folder} is neither a run folder nor a model folder")
    spec = run.read_spec()
    output = run.output(spec.method)
    if not output.is_dir():
        raise ModelError(f"{folder}: the run has not finished (no {output.name}/)")
    if spec.method == "full":
        return Target(("own", str(output)), output)
    if spec.method == "prompt_tuning":
        raise ModelError(f"{name}: prompt-tuning adapters are not served (their virtual tokens cannot share a "
                         "batch's KV cache); use `tuneforge generate`, or fine-tune with lora")
    base = resolve_model(spec.model)
    if spec.method in MIXABLE:
        return Target(("base", str(base)), base, adapter=name, source=AdapterSource(folder=output),
                      tokenizer_dir=output)
    return Target(("merged", str(folder)), base, tokenizer_dir=output, merge_adapter=output)


def _peft_folder_target(folder: Path, name: str) -> Target:
    import json

    from tuneforge.models import resolve_model

    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder / 'adapter_config.json'} is unreadable: {e}") from None
    base_ref = config.get("base_model_name_or_path")
    if not base_ref:
        raise ModelError(f"{folder / 'adapter_config.json'} names no base model (base_model_name_or_path)")
    base = resolve_model(str(base_ref))
    kind = config.get("peft_type")
    if kind == "LORA" and not config.get("use_dora"):
        return Target(("base", str(base)), base, adapter=name, source=AdapterSource(folder=folder),
                      tokenizer_dir=folder if (folder / "tokenizer_config.json").is_file() else None)
    if kind in ("LORA", "IA3"):
        return Target(("merged", str(folder)), base, merge_adapter=folder)
    raise ModelError(f"{name}: {kind} adapters are not served; serve a LoRA, DoRA or IA3 adapter")


def checkpoint_target(run: Path, step: int, name: str) -> Target:
    """Target for a training checkpoint of a LoRA/QLoRA run (its trainable weights + the run's peft config)."""
    from tuneforge.methods.peft_builders import build_peft_config
    from tuneforge.models import resolve_model

    run_dir = RunDir(run)
    spec = run_dir.read_spec()
    if spec.method not in MIXABLE:
        raise ModelError(f"{name}: checkpoints of {spec.method} runs are not served; serve the finished model")
    found = run_dir.checkpoint_at(step)
    if found is None:
        raise ModelError(f"{name}: checkpoint step {step} is no longer on disk")
    base = resolve_model(spec.model)
    import json

    model_type = json.loads((base / "config.json").read_text()).get("model_type", "")
    a = spec.adapter
    config = build_peft_config("lora", model_type, r=a.r, alpha=a.alpha, dropout=0.0, target_modules=a.target_modules)
    config.inference_mode = True
    return Target(("base", str(base)), base, adapter=name,
                  source=AdapterSource(weights=found.weights, config=config))


class ModelServer:
    """Loaded engines by key, created on first use; tokenizers by folder."""

    def __init__(self, *, max_batch: int = 16, max_waiting: int = 64, max_adapters: int = 8,
                 max_adapter_bytes: int = 2 * 2**30, precision: str = "fp32", threads: int | None = None,
                 prefix_cache_bytes: int = 0):
        self.max_batch, self.max_waiting, self.precision = max_batch, max_waiting, precision
        self.prefix_cache_bytes = prefix_cache_bytes  # per PyTorch engine; 0: no prefix caching
        self.threads = threads  # ONNX Runtime's intra-op threads per ONNX engine (None: its default)
        self.max_adapters, self.max_adapter_bytes = max_adapters, max_adapter_bytes
        self.engines: dict[tuple, Engine] = {}
        self.tokenizers: dict[str, object] = {}
        self.vocabularies: dict[str, object] = {}
        self.lock = threading.Lock()

    def engine(self, target: Target) -> Engine:
        with self.lock:
            engine = self.engines.get(target.engine_key)
            if engine is None:
                engine = self.engines[target.engine_key] = self._start(target)
        if target.adapter is not None:
            engine.adapters.register(target.adapter, target.source)
        return engine

    def _start(self, target: Target) -> Engine:
        # The inference stack (torch, transformers, peft; ONNX Runtime) is imported here, when the first model
        # loads: the API process starts in about a second and needs none of it for fine-tuning alone.
        import torch

        from tuneforge.models import load_model
        from tuneforge.serving.adapters import AdapterSet
        from tuneforge.serving.engine import BatchEngine
        from tuneforge.serving.onnx_engine import OnnxEngine

        if target.engine_key[0] == "onnx":
            return OnnxEngine(target.model_dir, threads=self.threads, max_batch=self.max_batch,
                              max_waiting=self.max_waiting, name=str(target.model_dir))

        model = load_model(target.model_dir).eval()
        adapters = None
        if target.merge_adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, target.merge_adapter).merge_and_unload().eval()
        if self.precision == "bf16":  # half the weight traffic, ~3x the GEMM rate on CPUs with AVX512-BF16/AMX
            model = model.to(torch.bfloat16)
        if target.merge_adapter is None and target.engine_key[0] == "base":
            adapters = AdapterSet(model, max_adapters=self.max_adapters, max_bytes=self.max_adapter_bytes)
        return BatchEngine(model, adapters=adapters, max_batch=self.max_batch, max_waiting=self.max_waiting,
                           name=str(target.engine_key[1]), prefix_cache_bytes=self.prefix_cache_bytes)

    def tokenizer(self, target: Target):
        from tuneforge.models import load_tokenizer

        folder = str(target.tokenizer_dir or target.model_dir)
        with self.lock:
            if folder not in self.tokenizers:
                self.tokenizers[folder] = load_tokenizer(Path(folder))
            return self.tokenizers[folder]

    def vocabulary(self, target: Target):
        """serving.grammar.Vocabulary of the target's tokenizer over its engine's logits (grammars, token bytes)."""
        from tuneforge.inference import stop_ids
        from tuneforge.serving.grammar import Vocabulary

        tok, engine = self.tokenizer(target), self.engine(target)
        key = f"{target.tokenizer_dir or target.model_dir}|{engine.vocab_size}"
        with self.lock:
            if key not in self.vocabularies:
                self.vocabularies[key] = Vocabulary(tok, engine.vocab_size, stop_ids(tok))
            return self.vocabularies[key]

    def stop(self) -> None:
        for engine in self.engines.values():
            engine.stop()
