"""Export a run as one GGUF file (llama.cpp, Ollama): merged weights, tokenizer and chat template, f16 or q8_0.

    tuneforge export gguf runs/demo --type q8_0 --out exports/demo-q8_0.gguf

Written with the `gguf` package (the writer llama.cpp's own converter uses): tensor names come from
gguf's name tables for the architecture, Llama-family q/k projections are permuted into llama.cpp's
rotary layout (transformers' GGUF loader undoes it), 1-D tensors and norms stay fp32 as llama.cpp
expects. The gates (`gates.py`) run on the file read back through transformers' GGUF loader — so the
check covers the names, the permutation, the tokenizer and the chat template, not just the weights —
and `<file>.export.json` records them. `LlamaCppRunner` runs the same gates in llama.cpp itself when
llama-cpp-python is installed (`tests/integration/test_export.py -m llamacpp`).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch

from tuneforge import files
from tuneforge.errors import OutputError, SpecError
from tuneforge.export import gates
from tuneforge.export.gates import ExportError, GateFailed
from tuneforge.export.onnx import base_record, decoder, load_run, references

TYPES = ("f16", "q8_0")
# transformers architecture -> (gguf architecture, permute q/k for llama.cpp's rotary layout)
ARCHITECTURES = {"LlamaForCausalLM": ("llama", True), "MistralForCausalLM": ("llama", True),
                 "Qwen2ForCausalLM": ("qwen2", False), "Phi3ForCausalLM": ("phi3", False)}
MADE_BY = "tuneforge.export"  # metadata key: a GGUF file tuneforge may replace

# llama.cpp names the BPE pre-tokenizer by a hash of how it splits a fixed text (its convert script's
# check text and a few of its entries: the families tuneforge ships; others fall back to "default").
_PRE_CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
                   '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
                   '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
                   '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
_PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def pre_tokenizer_name(tokenizer) -> str:
    ids = tokenizer.encode(_PRE_CHECK_TEXT)
    return _PRE_BY_HASH.get(sha256(str(ids).encode()).hexdigest(), "default")


def permute_for_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs, per head: (out, in) -> (out, in)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def check_tokenizer(tokenizer) -> None:
    """ExportError unless the tokenizer is a byte-level BPE with merges (what the writer supports)."""
    kind = tokenizer.backend_tokenizer.model.__class__.__name__ if hasattr(tokenizer, "backend_tokenizer") else "slow"
    if kind != "BPE":
        raise ExportError("GGUF export supports byte-level BPE tokenizers (Llama 3, SmolLM, Qwen2, GPT-2 style); "
                          f"this model's is {kind}")
    if not json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("merges"):
        raise ExportError("GGUF export: the tokenizer has no BPE merges (a bytes-only vocabulary), which llama.cpp "
                          "cannot load")


def _vocab(tokenizer, vocab_size: int):
    import gguf

    check_tokenizer(tokenizer)
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_gguf(hf_dir: Path, path: Path, qtype: str, model, tokenizer, metadata: dict) -> dict:
    """Write `model` (a merged transformers model whose tokenizer is saved in `hf_dir`) to `path`."""
    import gguf

    config = model.config
    arch_name = (config.architectures or [type(model).__name__])[0]
    if arch_name not in ARCHITECTURES:
        raise ExportError(f"GGUF export supports {', '.join(sorted(ARCHITECTURES))}; this run's model is {arch_name}")
    arch, permute = ARCHITECTURES[arch_name]
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    n_layers, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise ExportError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not supported yet")

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(metadata.get("name", path.stem))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    if arch == "phi3":
        writer.add_rope_scaling_orig_ctx_len(config.max_position_embeddings)
    tokens, types = _vocab(tokenizer, config.vocab_size)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:  # gguf cannot store an empty list, and llama.cpp refuses a BPE vocabulary without it
        raise ExportError("GGUF export: the tokenizer has no BPE merges (a bytes-only vocabulary), which llama.cpp "
                          "cannot load")
    special.add_to_gguf(writer, quiet=True)
    writer.add_string(MADE_BY, json.dumps(metadata))

    names = gguf.get_tensor_name_map(model_arch, n_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    wanted = gguf.GGMLQuantizationType.F16 if qtype == "f16" else gguf.GGMLQuantizationType.Q8_0
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd for the output when there is no output.weight
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"GGUF export: no GGUF name for tensor {name} of {arch_name}")
        data = tensor.detach().float()
        if permute and name.endswith("q_proj.weight"):
            data = permute_for_rope(data, n_head)
        elif permute and name.endswith("k_proj.weight"):
            data = permute_for_rope(data, n_kv)
        array = data.numpy()
        qt = gguf.GGMLQuantizationType.F32 if array.ndim <= 1 or new.endswith("_norm.weight") else wanted
        try:
            out = gguf.quants.quantize(array, qt)
        except gguf.QuantError:  # a row length q8_0 cannot block: f16, as llama.cpp's converter does
            qt = gguf.GGMLQuantizationType.F16
            out = gguf.quants.quantize(array, qt)
        writer.add_tensor(new, out, raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch, "tensors": len(model.state_dict()) - (1 if tied else 0),
            "pre_tokenizer": pre_tokenizer_name(tokenizer)}


def made_by_tuneforge(path: Path) -> bool:
    try:
        import gguf

        return MADE_BY in gguf.GGUFReader(str(path)).fields
    except Exception:  # noqa: BLE001 — not a GGUF file at all
        return False


def check_out_file(out: Path, run: Path) -> None:
    from tuneforge.inference import require_finished_run

    require_finished_run(run)
    if out.suffix != ".gguf":
        raise SpecError(f"--out: give a .gguf file name, got {out}")
    if out.is_symlink() or out.is_dir():
        raise OutputError(f"--out: {out} is a {'link' if out.is_symlink() else 'folder'}; give a .gguf file path")
    if run.resolve() in out.resolve().parents:
        raise OutputError(f"--out: {out} lies inside the run being exported ({run}); write it elsewhere")
    files.check_writable_folder(out.parent, "--out")
    if out.exists() and not made_by_tuneforge(out):
        raise OutputError(f"--out: {out} exists and tuneforge did not write it; choose another file or delete it yourself")


def read_back(path: Path):
    """(model, tokenizer) from the GGUF file through transformers' GGUF loader (dequantised to fp32)."""
    import logging

    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("transformers.modeling_gguf_pytorch_utils").setLevel(logging.ERROR)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 — any failure to read our own file back is the export's failure
        raise GateFailed(f"the GGUF file {path} cannot be read back by transformers: {type(e).__name__}: {e}") from None
    return model.eval(), tokenizer


def tokenizer_gate(reference_tokenizer, gguf_tokenizer, prompts: list[list[int]]) -> gates.Gate:
    """The file's tokenizer splits the held-out prompts into the same ids, and carries the same chat template."""
    texts = [reference_tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
    same = [gguf_tokenizer(t, add_special_tokens=False)["input_ids"] == reference_tokenizer(t, add_special_tokens=False)["input_ids"]
            for t in texts]
    template_ok = (gguf_tokenizer.chat_template or "") == (reference_tokenizer.chat_template or "")
    ok = all(same) and template_ok
    return gates.Gate("tokenizer", ok, f"the file's tokenizer encodes {sum(same)}/{len(same)} prompts identically; "
                      f"chat template {'identical' if template_ok else 'DIFFERS'}",
                      {"prompts": len(same), "identical": sum(same), "chat_template_identical": template_ok})


class LlamaCppRunner:
    """The GGUF file in llama.cpp itself (llama-cpp-python): greedy decoding and teacher-forced scoring."""

    def __init__(self, path: Path, threads: int | None = None, n_ctx: int = 1024):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                         n_threads=threads or os.cpu_count(), n_batch=512)

    def greedy(self, prompt: list[int], max_new_tokens: int, stops: list[int]) -> list[int]:
        self.llm.reset()
        self.llm.eval(prompt)
        new: list[int] = []
        while len(new) < max_new_tokens:
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            new.append(token)
            if token in stops:
                break
            self.llm.eval([token])
        return new

    def score(self, example) -> tuple[list[float], list[int]]:
        self.llm.reset()
        self.llm.eval(example.input_ids)
        positions = gates.target_positions(example)
        logits = np.asarray(self.llm.scores[[t - 1 for t in positions]], dtype=np.float64)  # (N, V)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = [float(-logp[i, example.input_ids[t]]) for i, t in enumerate(positions)]
        return nll, logp.argmax(-1).tolist()


def merged_model(loaded):
    """The run's model with its adapter merged into the weights (a full fine-tune as it is)."""
    return loaded.model.merge_and_unload() if hasattr(loaded.model, "merge_and_unload") else loaded.model


def export_gguf(run_dir: str | Path, out: str | Path, qtype: str = "f16", *, data: str | Path | None = None,
                prompts: int = 8, max_new_tokens: int = 64, loss_tolerance: float | None = None,
                threads: int | None = None, keep_failed: bool = False) -> dict:
    """Write the run (adapter merged) as a GGUF file `out` of type f16 or q8_0, gated on equivalence with
    the PyTorch model through transformers' GGUF loader; the gates go to `<out>.export.json`."""
    import gguf  # noqa: F401

    started = time.perf_counter()
    if qtype not in TYPES:
        raise SpecError(f"--type: choose one of {', '.join(TYPES)}, got {qtype!r}")
    if max_new_tokens < 1 or prompts < 1:
        raise SpecError("--max-new-tokens and --prompts must be at least 1")
    run, out = Path(run_dir), files.expand(out)
    check_out_file(out, run)
    spec, loaded = load_run(run)
    check_tokenizer(loaded.tokenizer)
    held, tuned, base = references(spec, loaded, data, prompts, max_new_tokens)
    model = merged_model(loaded)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    record_path = out.with_name(out.name + ".export.json")
    metadata = {"run": str(run.resolve()), "base_model": spec.model, "method": spec.method, "type": qtype}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # checked writable above; `--out exports/x.gguf` makes exports/
    except OSError as e:
        raise files.disk_error(e, out.parent) from None
    try:
        with tempfile.TemporaryDirectory(prefix="tuneforge-gguf-") as work:
            loaded.tokenizer.save_pretrained(work)
            start = time.perf_counter()
            info = write_gguf(Path(work), tmp, qtype, model, loaded.tokenizer, metadata)
            seconds = time.perf_counter() - start
        del model
        # read back through transformers under the final name's suffix (its loader wants a .gguf file)
        probe = tmp.with_name(tmp.name + ".gguf")
        tmp.rename(probe)
        tmp = probe
        back, back_tokenizer = read_back(tmp)
        from tuneforge.inference import stop_ids

        exported = gates.run(gates.TorchRunner(back), held, max_new_tokens, stop_ids(loaded.tokenizer))
        results = [tokenizer_gate(loaded.tokenizer, back_tokenizer, held.prompts)]
        results += gates.evaluate(tuned, base, exported, qtype, loss_tolerance, references=held.references,
                                  decode=decoder(loaded.tokenizer))
        del back
        import gguf as gguf_package

        record = base_record("gguf", run, spec, held, type=qtype, engine="transformers GGUF loader "
                            "(dequantised to fp32)", writer=f"gguf {getattr(gguf_package, '__version__', '')}".strip(),
                            write_seconds=round(seconds, 2), max_new_tokens=max_new_tokens, **info,
                            bytes=tmp.stat().st_size, seconds=round(time.perf_counter() - started, 1),
                            gates=gates.gates_record(results),
                            passed=all(g.passed for g in results), path=str(out.resolve()),
                            record_file=str(record_path.resolve()))
        if not record["passed"] and not keep_failed:
            tmp.unlink()
            raise GateFailed(gates.failure_message(f"the {qtype} GGUF export of {run}", results)
                             + f"\nnothing was written to {out} (--keep-failed keeps the failed file to inspect)", record)
        files.atomic_write_text(record_path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    if not record["passed"]:
        raise GateFailed(gates.failure_message(f"the {qtype} GGUF export of {run}", results)
                         + f"\nthe failed file was kept at {out} (--keep-failed); do not deploy it", record)
    return record

