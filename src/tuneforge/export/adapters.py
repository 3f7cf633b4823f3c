"""Multi-LoRA ONNX export: the base model built once with LoRA weights as graph inputs, one adapter file per run.

    tuneforge export onnx runs/triage --adapters --out exports/smollm2-lora      # builds the base + triage
    tuneforge export onnx runs/billing --adapters --out exports/smollm2-lora     # adds billing, same base

Layout of the folder:
    model.onnx, model.onnx.data, genai_config.json, tokenizer files   the base graph (no fine-tuned weights)
    adapters/base.onnx_adapter                                         rank 0: the base model itself
    adapters/NAME.onnx_adapter                                         one per run (onnxruntime AdapterFormat)
    export.json                                                        graph, base fingerprint, per-adapter gates

How the graph is made: onnxruntime-genai's builder emits a LoRA branch (x·A·B added to x·W) for every
linear layer of a peft adapter it is given. We give it a placeholder adapter on *every* linear layer of
the architecture, then rewrite the graph with `onnx`: each branch's A and B initializers become graph
inputs whose rank dimension is symbolic. Any plain LoRA adapter of this base (any rank, any subset of those
layers) then fits: its A and B·scaling are written under the input names (layers it does not target get
zero matrices), and ONNX Runtime GenAI swaps them per generator (`og.Adapters`, `set_active_adapter`). One
adapter must always be active; `base` (rank 0) gives the base model. With an int8/int4 base the LoRA
MatMuls are excluded from quantization, so adapters stay exact fp32.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from tuneforge import files
from tuneforge.errors import OutputError, SpecError
from tuneforge.export import gates
from tuneforge.export.gates import ExportError, GateFailed
from tuneforge.export.onnx import (BUILDER_ARCHITECTURES, EXPORT_MARKER, OnnxRunner, base_record, build, check_args,
                                   check_out_folder, decoder, fix_config_for_builder, install, load_run, references,
                                   write_record)

FORMAT = "onnx-adapters"
BASE_ADAPTER = "base"
# Linear layers per architecture as peft names them, and how the builder splits fused ones (rows of lora_B).
PEFT_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}
PEFT_TARGETS["mistral"] = PEFT_TARGETS["qwen2"] = PEFT_TARGETS["llama"]
GRAPH_GROUP = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def graph_input(layer: int, proj: str, which: str) -> str:
    """The builder's initializer name for a LoRA weight (`which` is 'A' or 'B')."""
    return f"model.layers.{layer}.{GRAPH_GROUP[proj]}.{proj}.lora_{which}.MatMul.weight"


def graph_node(layer: int, proj: str, which: str) -> str:
    return f"/model/layers.{layer}/{GRAPH_GROUP[proj]}/{proj}/lora_{which}/MatMul"


def split_fused(proj: str, config) -> list[tuple[str, int]]:
    """How the builder unpacks a fused peft target: [(graph proj, rows of lora_B)]."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if proj == "qkv_proj":
        q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        return [("q_proj", q), ("k_proj", kv), ("v_proj", kv)]
    if proj == "gate_up_proj":
        return [("gate_proj", config.intermediate_size), ("up_proj", config.intermediate_size)]
    return [(proj, -1)]


def base_fingerprint(folder: Path) -> str:
    """Identifies the base weights an adapters export was built from (config + size and ends of each file)."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        with open(path, "rb") as f:
            h.update(str(size).encode())
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read())
    return h.hexdigest()[:32]


def check_plain_lora(spec, model) -> None:
    if spec.method not in ("lora", "qlora"):
        raise ExportError(f"--adapters exports LoRA adapters; this run's method is {spec.method} (export it merged, "
                          "without --adapters)")
    config = model.peft_config["default"]
    problems = []
    if getattr(config, "use_dora", False):
        problems.append("DoRA")
    if getattr(config, "bias", "none") != "none" or getattr(config, "lora_bias", False):
        problems.append("trained biases")
    if getattr(config, "modules_to_save", None):
        problems.append(f"fully trained modules ({', '.join(config.modules_to_save)})")
    if problems:
        raise ExportError(f"--adapters: the adapter has {', '.join(problems)}, which a LoRA graph input cannot carry; "
                          "export it merged (without --adapters)")


def adapter_arrays(peft_model, arch: str, inputs: dict[str, list], config) -> tuple[dict[str, np.ndarray], int]:
    """The run's LoRA weights under the graph's input names: A as (in, r), B·scaling as (r, out); every
    module padded with zeros to the adapter's largest rank, untargeted inputs all zeros. Returns (arrays, rank)."""
    from peft.tuners.lora import LoraLayer

    pieces: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module_name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        match = re.search(r"layers\.(\d+)\.[^.]+\.([a-z_]+)$", module_name)
        if not match or match.group(2) not in PEFT_TARGETS[arch]:
            raise ExportError(f"--adapters: the adapter trains {module_name}, which the {arch} LoRA graph has no "
                              f"input for (it covers {', '.join(PEFT_TARGETS[arch])}); export it merged")
        layer, proj = int(match.group(1)), match.group(2)
        a = module.lora_A["default"].weight.detach().float().numpy()  # (r, in)
        b = (module.lora_B["default"].weight.detach().float() * module.scaling["default"]).numpy()  # (out, r)
        start = 0
        for graph_proj, rows in split_fused(proj, config):
            part = b if rows < 0 else b[start:start + rows]
            start += max(rows, 0)
            pieces[graph_input(layer, graph_proj, "A")] = (a.T, part.T)
    rank = max((a.shape[1] for a, _ in pieces.values()), default=0)
    arrays = {}
    for a_name, (in_dim, _) in ((n, s) for n, s in inputs.items() if ".lora_A." in n):
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        out_dim = inputs[b_name][1]
        a = np.zeros((in_dim, rank), np.float32)
        b = np.zeros((rank, out_dim), np.float32)
        if a_name in pieces:
            pa, pb = pieces.pop(a_name)
            a[:, : pa.shape[1]], b[: pb.shape[0]] = pa, pb
        arrays[a_name], arrays[b_name] = a, b
    if pieces:
        raise ExportError(f"--adapters: no graph input for {sorted(pieces)[0]}: the export's graph does not match "
                          "this adapter's model")
    return arrays, rank


def write_adapter(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    tmp = path.with_name(f".tmp-{path.name}")
    fmt.export_adapter(str(tmp))
    os.replace(tmp, path)


def lora_inputs_rewrite(folder: Path) -> dict[str, list]:
    """Turn the builder's LoRA initializers into graph inputs with a symbolic rank; returns {name: [in, out]}
    (the A input's rows, the B input's columns; the other entry is the rank)."""
    import onnx
    from onnx import helper

    path = folder / "model.onnx"
    model = onnx.load(str(path), load_external_data=True)
    lora = [t for t in model.graph.initializer if ".lora_A." in t.name or ".lora_B." in t.name]
    if not lora:
        raise ExportError("the builder produced no LoRA weights to turn into inputs")
    shapes = {}
    for tensor in lora:
        rows, cols = tensor.dims
        is_a = ".lora_A." in tensor.name
        if tensor.data_type != onnx.TensorProto.FLOAT:
            raise ExportError(f"the builder stored LoRA weight {tensor.name} as {onnx.TensorProto.DataType.Name(tensor.data_type)}, "
                              "not fp32 (was it quantised?)")
        shapes[tensor.name] = [rows, "lora_rank"] if is_a else ["lora_rank", cols]
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, shapes[tensor.name]))
    keep = [t for t in model.graph.initializer if t.name not in shapes]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for name in ("model.onnx", "model.onnx.data"):
        (folder / name).unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return {n: [s[0], None] if s[1] == "lora_rank" else [None, s[1]] for n, s in shapes.items()}


def placeholder_adapter(base_dir: Path, dest: Path, arch: str) -> None:
    """A rank-1 peft adapter on every linear layer of `arch`: only its shape matters (the weights become inputs)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tuneforge.models import load_model

    model = load_model(base_dir)
    torch.manual_seed(0)
    config = LoraConfig(r=1, lora_alpha=1, target_modules=list(PEFT_TARGETS[arch]), init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(dest, safe_serialization=True)


def builder_input(base_dir: Path, tokenizer, dest: Path) -> None:
    """A transformers folder for the builder: the base's weights linked (never written), its config (fixed
    for the builder) and the run's tokenizer (its chat template) written fresh."""
    dest.mkdir(parents=True)
    for path in base_dir.iterdir():
        if path.suffix == ".safetensors" or path.name in ("model.safetensors.index.json", "generation_config.json"):
            (dest / path.name).symlink_to(path.resolve())
    (dest / "config.json").write_text((base_dir / "config.json").read_text())
    fix_config_for_builder(dest)
    tokenizer.save_pretrained(dest)


def build_base(out: Path, base_dir: Path, tokenizer, arch: str, config, precision: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="tuneforge-adapters-") as work:
        hf_dir, adapter_dir = Path(work) / "base", Path(work) / "placeholder"
        builder_input(base_dir, tokenizer, hf_dir)
        placeholder_adapter(base_dir, adapter_dir, arch)
        options = {"adapter_path": str(adapter_dir)}
        if precision != "fp32":  # keep the LoRA MatMuls fp32: their weights are inputs, set per adapter
            graph_projs = sorted({p for t in PEFT_TARGETS[arch] for p, _ in split_fused(t, config)})
            options["nodes_to_exclude"] = ",".join(graph_node(i, p, w) for i in range(config.num_hidden_layers)
                                                   for p in graph_projs for w in "AB")
        seconds = build(hf_dir, out, precision, options, cache_dir=Path(work) / "cache")
    inputs = lora_inputs_rewrite(out)
    return {"build_seconds": round(seconds, 2), "lora_inputs": len(inputs), "inputs": inputs}


def graph_inputs(record: dict) -> dict[str, list]:
    return record["graph"]["inputs"]


def export_onnx_adapter(run_dir: str | Path, out: str | Path, precision: str | None = None, *, name: str | None = None,
                        data: str | Path | None = None, prompts: int = 8, max_new_tokens: int = 64,
                        loss_tolerance: float | None = None, threads: int | None = None,
                        keep_failed: bool = False) -> dict:
    """Add the run's LoRA adapter to the adapters export `out`, building the base graph first when `out` is
    new; each adapter (and the base) is gated against its PyTorch model. Returns export.json's content."""
    from tuneforge.models import resolve_model

    run, out = Path(run_dir), files.expand(out)
    name = name or run.resolve().name
    if not NAME_RE.match(name) or name == BASE_ADAPTER:
        raise SpecError(f"--name: {name!r} is not a usable adapter name (letters, digits, '.', '_', '-'; not "
                        f"'{BASE_ADAPTER}'); pass --name")
    existing = None
    if (out / "export.json").is_file() and (out / EXPORT_MARKER).is_file():
        existing = json.loads((out / "export.json").read_text())
        if existing.get("format") != FORMAT:
            raise OutputError(f"--out: {out} holds a merged {existing.get('format')} export, not an adapters export; "
                              "choose another folder")
        precision = precision or existing["precision"]
        if precision != existing["precision"]:
            raise SpecError(f"--precision: {out} is an {existing['precision']} adapters export; pass --precision "
                            f"{existing['precision']} (or export to another folder)")
    else:
        check_out_folder(out, run)
    precision = precision or "fp32"
    check_args(precision, max_new_tokens, prompts, loss_tolerance)

    spec, loaded = load_run(run)
    check_plain_lora(spec, loaded.model)
    base_dir = resolve_model(spec.model)
    fingerprint = base_fingerprint(base_dir)
    config = loaded.model.get_base_model().config
    arch = BUILDER_ARCHITECTURES.get((config.architectures or [""])[0])
    if arch is None:
        raise ExportError(f"ONNX export supports {', '.join(sorted(PEFT_TARGETS))} models; this run's model is "
                          f"{(config.architectures or ['?'])[0]}")
    if existing and existing["base_fingerprint"] != fingerprint:
        raise ExportError(f"{run} was trained on {spec.model}, whose weights differ from the base of the adapters "
                          f"export {out} ({existing['base_model']}); export it to another folder")
    held, tuned, base = references(spec, loaded, data, prompts, max_new_tokens, base_greedy=existing is None)
    decode = decoder(loaded.tokenizer)
    from tuneforge.inference import stop_ids

    stops = stop_ids(loaded.tokenizer)
    folder = out if existing else files.temporary_folder(out)
    adapter_path = folder / "adapters" / f"{name}.onnx_adapter"
    replaced = adapter_path.exists()
    try:
        if existing is None:
            graph = build_base(folder, base_dir, loaded.tokenizer, arch, config, precision)
            (folder / "adapters").mkdir()
            base_arrays = {k: np.zeros((v[0], 0) if v[0] is not None else (0, v[1]), np.float32)
                           for k, v in graph["inputs"].items()}
            write_adapter(folder / "adapters" / f"{BASE_ADAPTER}.onnx_adapter", base_arrays)
            base_runner = OnnxRunner(folder, threads=threads, adapter_file=folder / "adapters" / f"{BASE_ADAPTER}.onnx_adapter")
            base_exported = gates.run(base_runner, held, max_new_tokens, stops)
            del base_runner
            # the base adapter must be the base: the same gates with the roles of base and fine-tune swapped
            base_gates = gates.evaluate(base, tuned, base_exported, precision, loss_tolerance,
                                        references=held.references, decode=decode)
            import onnxruntime_genai

            record = {"format": FORMAT, "precision": precision, "architecture": arch, "base_model": spec.model,
                      "base_fingerprint": fingerprint, "engine": f"onnxruntime-genai {onnxruntime_genai.__version__}",
                      "graph": graph, "path": str(out.resolve()), "record_file": str(out.resolve() / "export.json"),
                      "adapters": {BASE_ADAPTER: {"file": f"adapters/{BASE_ADAPTER}.onnx_adapter", "rank": 0,
                                                  "gates": gates.gates_record(base_gates),
                                                  "passed": all(g.passed for g in base_gates)}}}
            if not record["adapters"][BASE_ADAPTER]["passed"]:
                raise GateFailed(gates.failure_message(f"the {precision} base graph of {spec.model}", base_gates), record)
        else:
            record = existing
        arrays, rank = adapter_arrays(loaded.model, arch, graph_inputs(record), config)
        tmp_adapter = adapter_path.with_name(f".tmp-new-{adapter_path.name}")
        write_adapter(tmp_adapter, arrays)
        runner = OnnxRunner(folder, threads=threads, adapter_file=tmp_adapter)
        exported = gates.run(runner, held, max_new_tokens, stops)
        del runner
        results = gates.evaluate(tuned, base, exported, precision, loss_tolerance, references=held.references,
                                 decode=decode)
        entry = base_record("onnx-adapter", run, spec, held, file=f"adapters/{name}.onnx_adapter", rank=rank,
                            max_new_tokens=max_new_tokens, gates=gates.gates_record(results),
                            passed=all(g.passed for g in results))
        if not entry["passed"] and not keep_failed:
            tmp_adapter.unlink()
            raise GateFailed(gates.failure_message(f"adapter {name!r} ({run}) in the {precision} adapters export",
                                                   results) + f"\nit was not added to {out}", entry)
        os.replace(tmp_adapter, adapter_path)
        record["adapters"][name] = entry
        write_record(folder, record)
        if existing is None:
            files.mark(folder, EXPORT_MARKER)
            install(folder, out)
    except BaseException:
        if existing is None:
            files.remove_temporary(folder)
        elif (tmp := adapter_path.with_name(f".tmp-new-{adapter_path.name}")).exists():
            tmp.unlink()
        raise
    if not entry["passed"]:
        raise GateFailed(gates.failure_message(f"adapter {name!r} ({run})", results)
                         + f"\nit was kept in {out} (--keep-failed); do not serve it", entry)
    return {**record, "added": name, "replaced": replaced, "gates": entry["gates"], "passed": True,
            "path": str(out.resolve()), "record_file": str(out.resolve() / "export.json")}
