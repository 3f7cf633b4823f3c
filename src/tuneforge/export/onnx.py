"""Export a run to ONNX Runtime GenAI (fp32 / int8 / int4), gated on equivalence with the trained model.

    tuneforge export onnx runs/demo --precision int4 --out exports/demo-int4

Steps, top to bottom (`export_onnx`):
1. check the run, the output folder and the held-out data before anything is built;
2. score the PyTorch model on the held-out data with the adapter applied (peft's forward) and with it
   disabled (the base): greedy tokens and teacher-forced answer scores (`gates.reference_scores`);
3. merge the adapter into the weights and save a plain transformers folder in a temporary directory;
4. build the ONNX model from it with onnxruntime-genai's model builder (a subprocess: the builder prints a
   lot and holds the whole model; its process ends with it);
5. run the same held-out data through ONNX Runtime GenAI (`OnnxRunner`) and apply the gates;
6. write `export.json` (the gates, their numbers, the data they ran on) and move the folder into place
   only when every gate passed; a failed gate is exit code 3 (the folder is kept only with --keep-failed).

`--adapters` (see `export/adapters.py`) exports the base once with LoRA weights as graph inputs and each
run as a hot-swappable adapter file instead.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tuneforge import files
from tuneforge.data.encode import Example
from tuneforge.errors import OutputError, SpecError
from tuneforge.export import gates
from tuneforge.export.gates import ExportError, GateFailed

PRECISIONS = ("fp32", "int8", "int4")
EXPORT_MARKER = ".tuneforge-export"
# Architectures onnxruntime-genai's builder turns into its decoder graph and that tuneforge tests (llama,
# phi3) or that share llama's layout (mistral, qwen2).
BUILDER_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                         "Phi3ForCausalLM": "phi3"}


def require_runtime() -> None:
    """ExportError naming the packages to install unless ONNX Runtime GenAI and its helpers import."""
    for module, package in (("onnxruntime_genai", "onnxruntime-genai"), ("onnx", "onnx"), ("onnx_ir", "onnx-ir"),
                            ("onnxruntime", "onnxruntime")):
        try:
            __import__(module)
        except ImportError:
            raise ExportError(f"ONNX export needs {package}: pip install onnxruntime onnxruntime-genai onnx onnx-ir") from None


class OnnxRunner:
    """An exported folder run through ONNX Runtime GenAI: greedy decoding and teacher-forced scoring.
    `adapter_file`: an adapters export's adapter to keep active; more can be loaded with `load_adapter`
    and switched with `use` (one model in memory, adapters hot-swapped per generator)."""

    def __init__(self, folder: str | Path, *, threads: int | None = None, adapter_file: str | Path | None = None):
        require_runtime()
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                                  "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.adapters = None
        self.active: str | None = None
        if adapter_file is not None:
            self.load_adapter("active", adapter_file)
            self.use("active")

    def load_adapter(self, name: str, path: str | Path) -> None:
        if self.adapters is None:
            self.adapters = self.og.Adapters(self.model)
        self.adapters.load(str(path), name)

    def use(self, name: str) -> None:
        self.active = name

    def generator(self, max_length: int, temperature: float = 0.0, seed: int = 0, adapter: str | None = None):
        """A fresh generator (batch of one, its own KV cache) running `adapter` (default: the active one)."""
        params = self.og.GeneratorParams(self.model)
        if temperature > 0:
            params.set_search_options(max_length=max_length, do_sample=True, temperature=temperature, random_seed=seed)
        else:
            params.set_search_options(max_length=max_length, do_sample=False)
        generator = self.og.Generator(self.model, params)
        adapter = adapter or self.active
        if adapter is not None:
            generator.set_active_adapter(self.adapters, adapter)
        return generator

    def greedy(self, prompt: list[int], max_new_tokens: int, stops: list[int], temperature: float = 0.0,
               seed: int = 0) -> list[int]:
        """Greedy continuation (sampled when `temperature` > 0); ends after a stop token."""
        generator = self.generator(len(prompt) + max_new_tokens, temperature, seed)
        generator.append_tokens(prompt)
        new: list[int] = []
        while len(new) < max_new_tokens and not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            new.append(token)
            if token in stops:
                break
        return new

    def score(self, example: Example) -> tuple[list[float], list[int]]:
        """Teacher forcing one token at a time from the first answer token (GenAI returns last-position logits)."""
        ids = example.input_ids
        positions = set(gates.target_positions(example))
        first = min(positions)
        generator = self.generator(len(ids) + 1)
        generator.append_tokens(ids[:first])
        nll, argmax = [], []
        for t in range(first, len(ids)):
            if t in positions:
                logits = np.asarray(generator.get_logits(), dtype=np.float64).reshape(-1)  # (V,)
                logp = logits - logits.max()
                logp -= np.log(np.exp(logp).sum())
                nll.append(float(-logp[ids[t]]))
                argmax.append(int(logp.argmax()))
            if t + 1 < len(ids):
                generator.append_tokens([ids[t]])
        return nll, argmax


def generate(export_dir: str | Path, prompts: list, *, max_new_tokens: int = 128, temperature: float = 0.0,
             adapter: str | None = None, threads: int | None = None, seed: int = 0, task: str | None = None,
             prompt_template: str | None = None) -> list[str]:
    """Complete prompts with an ONNX export (`tuneforge generate EXPORT_DIR --engine onnx`), formatted as the
    run was trained (task, prompt or chat template); an adapters export needs `adapter` unless it has one."""
    from tuneforge.data.encode import encode_prompt
    from tuneforge.inference import check_generation_args, stop_ids
    from tuneforge.models import load_tokenizer

    check_generation_args(max_new_tokens, temperature)
    folder = Path(export_dir)
    record_file = folder / "export.json"
    if not record_file.is_file() or not (folder / "genai_config.json").is_file():
        raise ExportError(f"{folder} is not an ONNX export of tuneforge (no export.json / genai_config.json); make one "
                          "with `tuneforge export onnx RUN --out DIR`")
    record = json.loads(record_file.read_text())
    adapter_file = None
    if record.get("format") == "onnx-adapters":
        names = [n for n in record["adapters"] if n != "base"]
        if adapter is None and len(names) == 1:
            adapter = names[0]
        if adapter is None or adapter not in record["adapters"]:
            raise SpecError(f"--adapter: choose one of {', '.join(record['adapters'])} (the adapters in {folder})"
                            + (f", got {adapter!r}" if adapter else ""))
        adapter_file = folder / record["adapters"][adapter]["file"]
        record = record["adapters"][adapter] if adapter != "base" else {"task": "chat"}
    elif adapter is not None:
        raise SpecError(f"--adapter: {folder} is a merged export with no adapters")
    tokenizer = load_tokenizer(folder)
    runner = OnnxRunner(folder, threads=threads, adapter_file=adapter_file)
    stops = stop_ids(tokenizer)
    task, template = task or record.get("task", "chat"), prompt_template or record.get("prompt_template")
    outputs = []
    for i, prompt in enumerate(prompts):
        ids = encode_prompt(tokenizer, task, prompt, template)
        new = runner.greedy(ids, max_new_tokens, stops, temperature, seed + i)
        outputs.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return outputs


# ---- output folders -------------------------------------------------------------------------------------

def check_out_folder(out: Path, run: Path, field: str = "--out") -> None:
    """OutputError unless `out` is new, empty, or an earlier tuneforge export (replaced); first, CheckpointError
    unless `run` is a finished run (what is wrong with the run is the first thing to say)."""
    from tuneforge.inference import require_finished_run

    require_finished_run(run)
    files.refuse_special(out, field)
    r, o = run.resolve(), out.resolve()
    if o == r or r in o.parents or o in r.parents:
        raise OutputError(f"{field}: {out} is, holds or lies inside the run being exported ({run}); "
                          "write the export to a folder of its own")
    files.check_writable_folder(out, field)
    if out.is_dir() and not files.is_empty_folder(out) and not (out / EXPORT_MARKER).is_file():
        raise OutputError(files.not_ours_message(out, EXPORT_MARKER, field))


def install(tmp: Path, out: Path) -> None:
    """Move the finished temporary folder onto `out`, replacing an earlier export (checked by `check_out_folder`)."""
    if out.is_dir() and files.is_empty_folder(out):
        out.rmdir()
    elif out.is_dir():
        if not (out / EXPORT_MARKER).is_file():  # checked before; re-checked: never delete what is not ours
            raise OutputError(files.not_ours_message(out, EXPORT_MARKER, "--out"))
        old = out.with_name(f".tmp-{out.name}-replaced-{os.getpid()}")
        out.rename(old)
        files.remove_temporary(old)
    tmp.rename(out)


def write_record(folder: Path, record: dict) -> None:
    files.atomic_write_text(folder / "export.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")


# ---- building -------------------------------------------------------------------------------------------

def save_merged(loaded, dest: Path) -> str:
    """Merge the run's adapter into its base weights and save a plain transformers folder; returns the
    architecture name. Called after the references were scored: merging changes `loaded.model` in place."""
    model = loaded.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    arch = (model.config.architectures or [type(model).__name__])[0]
    if arch not in BUILDER_ARCHITECTURES:
        raise ExportError(f"ONNX export supports {', '.join(sorted(set(BUILDER_ARCHITECTURES.values())))} models; "
                          f"this run's model is {arch}")
    model.save_pretrained(dest, safe_serialization=True)
    loaded.tokenizer.save_pretrained(dest)
    fix_config_for_builder(dest)
    return BUILDER_ARCHITECTURES[arch]


def fix_config_for_builder(folder: Path) -> None:
    """The builder picks Phi-3's long-RoPE graph whenever max_position_embeddings differs from
    original_max_position_embeddings, even without rope scaling; transformers then ignores the latter."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if config.get("model_type") == "phi3" and rope.get("rope_type", "default") == "default" \
            and config.get("original_max_position_embeddings") != config.get("max_position_embeddings"):
        config["original_max_position_embeddings"] = config["max_position_embeddings"]
        path.write_text(json.dumps(config, indent=2))


def build(hf_dir: Path, out_dir: Path, precision: str, extra_options: dict[str, str] | None = None,
          cache_dir: Path | None = None) -> float:
    """Run onnxruntime-genai's model builder on a transformers folder; returns its wall time in seconds."""
    require_runtime()
    options = [f"{k}={v}" for k, v in (extra_options or {}).items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tuneforge-builder-cache-") as own_cache:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
               "-p", precision, "-e", "cpu", "-c", str(cache_dir or own_cache)]
        if options:
            cmd += ["--extra_options", *options]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (out_dir / "genai_config.json").is_file():
        tail = "\n    ".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise ExportError(f"onnxruntime-genai's model builder failed (exit {proc.returncode}):\n    {tail}")
    return time.perf_counter() - start


# ---- the export -----------------------------------------------------------------------------------------

def check_args(precision: str, max_new_tokens: int, prompts: int, tolerance: float | None) -> None:
    if precision not in PRECISIONS:
        raise SpecError(f"--precision: choose one of {', '.join(PRECISIONS)}, got {precision!r}")
    if max_new_tokens < 1 or prompts < 1:
        raise SpecError("--max-new-tokens and --prompts must be at least 1")
    if tolerance is not None and not tolerance > 0:
        raise SpecError(f"--loss-tolerance: must be a positive fraction, e.g. 0.05, got {tolerance}")


def load_run(run: Path):
    """The finished run's spec and model (PyTorch, adapter applied) for export."""
    from tuneforge.inference import load, require_finished_run
    from tuneforge.training.run_dir import RunDir

    require_finished_run(run)
    spec = RunDir(run).read_spec()
    if spec.method == "prompt_tuning":
        raise ExportError("prompt tuning learns virtual input tokens, which ONNX Runtime GenAI and llama.cpp cannot "
                          f"take; export a LoRA, DoRA, IA3 or full fine-tune (or serve {run} with tuneforge)")
    return spec, load(run)


def references(spec, loaded, data, prompts: int, max_new_tokens: int, base_greedy: bool = False):
    """The held-out data and the PyTorch model's (fine-tuned, base) scores on it."""
    held = gates.heldout_data(loaded, spec, data, max_prompts=prompts)
    tuned, base = gates.reference_scores(loaded, held, max_new_tokens, base_greedy)
    if base is None:  # full fine-tune
        from tuneforge.inference import stop_ids

        base = gates.base_scores(spec, held, max_new_tokens, stop_ids(loaded.tokenizer), base_greedy)
    return held, tuned, base


def decoder(tokenizer):
    """Token ids -> answer text, as `tuneforge generate` prints it (for the task metric)."""
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()


def base_record(kind: str, run: Path, spec, held: gates.HeldOut, **extra) -> dict:
    import tuneforge

    return {"format": kind, **extra, "run": str(run.resolve()), "base_model": spec.model, "method": spec.method,
            "task": spec.task, "prompt_template": spec.data.prompt_template, "data": held.describe(),
            "tuneforge": tuneforge.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def export_onnx(run_dir: str | Path, out: str | Path, precision: str = "fp32", *, data: str | Path | None = None,
                prompts: int = 8, max_new_tokens: int = 64, loss_tolerance: float | None = None,
                threads: int | None = None, keep_failed: bool = False) -> dict:
    """Export a finished run as a merged ONNX Runtime GenAI model at `precision` into the folder `out`,
    gated on equivalence with the PyTorch model (see `gates`). Returns the record written to export.json;
    raises GateFailed (exit code 3) when a gate fails."""
    started = time.perf_counter()
    require_runtime()  # fail early, before the model loads
    check_args(precision, max_new_tokens, prompts, loss_tolerance)
    run, out = Path(run_dir), files.expand(out)
    check_out_folder(out, run)
    spec, loaded = load_run(run)
    held, tuned, base = references(spec, loaded, data, prompts, max_new_tokens)

    tmp = files.temporary_folder(out)
    try:
        with tempfile.TemporaryDirectory(prefix="tuneforge-export-") as work:
            hf_dir = Path(work) / "merged"
            arch = save_merged(loaded, hf_dir)
            del loaded
            build_seconds = build(hf_dir, tmp, precision, cache_dir=Path(work) / "cache")
        from tuneforge.inference import stop_ids
        from tuneforge.models import load_tokenizer

        runner = OnnxRunner(tmp, threads=threads)
        tokenizer = load_tokenizer(tmp)
        exported = gates.run(runner, held, max_new_tokens, stop_ids(tokenizer))
        del runner
        results = gates.evaluate(tuned, base, exported, precision, loss_tolerance, references=held.references,
                                 decode=decoder(tokenizer))
        import onnxruntime_genai

        record = base_record("onnx", run, spec, held, precision=precision, architecture=arch,
                             engine=f"onnxruntime-genai {onnxruntime_genai.__version__}",
                             build_seconds=round(build_seconds, 2), max_new_tokens=max_new_tokens,
                             seconds=round(time.perf_counter() - started, 1),
                             gates=gates.gates_record(results), passed=all(g.passed for g in results),
                             path=str(out.resolve()), record_file=str(out.resolve() / "export.json"))
        write_record(tmp, record)
        files.mark(tmp, EXPORT_MARKER)
        if not record["passed"] and not keep_failed:
            files.remove_temporary(tmp)
            raise GateFailed(gates.failure_message(f"the {precision} ONNX export of {run}", results)
                             + f"\nnothing was written to {out} (--keep-failed keeps the failed export to inspect)",
                             record)
        install(tmp, out)
    except BaseException:
        files.remove_temporary(tmp)
        raise
    if not record["passed"]:
        raise GateFailed(gates.failure_message(f"the {precision} ONNX export of {run}", results)
                         + f"\nthe failed export was kept in {out} (--keep-failed); do not deploy it", record)
    return record
