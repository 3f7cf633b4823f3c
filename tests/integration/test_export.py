"""Exports of tiny random Llama and Phi-3 runs, each checked by its equivalence gates: ONNX Runtime GenAI
fp32 (identical greedy tokens, `generate --engine onnx` = `generate`) and int8 (held-out loss); one base
graph serving two LoRA adapters and the base; deliberately broken exports (adapter dropped) failing with
exit code 3; GGUF f16 files read back by transformers with equal logits, q8_0 by its loss gate; and (marked
`llamacpp`, skipped without llama-cpp-python) the GGUF file run in llama.cpp itself."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import CHAT_RECORDS, tiny_spec, write_jsonl

pytest.importorskip("onnxruntime_genai")

HELD_OUT = [
    {"messages": [{"role": "user", "content": "Capital of Spain?"}, {"role": "assistant", "content": "Madrid."}]},
    {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]},
    {"messages": [{"role": "user", "content": "Colour of grass?"}, {"role": "assistant", "content": "Green, mostly."}]},
    {"messages": [{"role": "user", "content": "Say bye"}, {"role": "assistant", "content": "Bye, see you!"}]},
]


def train_run(model_dir: Path, root: Path, name: str, seed: int = 42, steps: int = 4) -> Path:
    import tuneforge

    train = write_jsonl(root / "train.jsonl", CHAT_RECORDS)
    valid = write_jsonl(root / "valid.jsonl", HELD_OUT)
    spec = tiny_spec(model_dir, train, root / name, max_steps=steps, seed=seed)
    spec["data"]["validation"] = str(valid)
    summary = tuneforge.train(spec, progress=False)
    assert summary.status == "succeeded"
    return root / name


@pytest.fixture(scope="session")
def tiny_runs(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """One tiny LoRA run per architecture (4 steps at lr 1e-2: the fine-tune visibly changes predictions)."""
    root = tmp_path_factory.mktemp("export-runs")
    return {arch: train_run(tiny_models[arch], root, f"run-{arch}") for arch in ("llama", "phi3", "qwen2")}


def gate(record: dict, name: str) -> dict:
    return next(g for g in record["gates"] if g["name"] == name)


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2"])
def test_onnx_fp32_export_has_identical_greedy_tokens(tiny_runs, tmp_path, arch):
    from tuneforge.export import export_onnx

    out = tmp_path / "onnx"
    record = export_onnx(tiny_runs[arch], out, "fp32", threads=1)
    assert record["passed"] and record["architecture"] == arch
    tokens = gate(record, "greedy_tokens")
    assert tokens["passed"] and tokens["detail"]["identical"] == tokens["detail"]["prompts"] == len(HELD_OUT)
    assert tokens["detail"]["tokens"] > 4 * len(HELD_OUT)  # real continuations, not one-token stops
    assert gate(record, "heldout_loss")["detail"]["relative_drift"] < 1e-4
    adapter = gate(record, "adapter_present")["detail"]
    assert adapter["positions_where_finetune_differs"] > 0
    assert adapter["export_agrees_with_finetune"] == adapter["positions_where_finetune_differs"]
    assert record["data"]["held_out"] and record["data"]["source"].endswith("valid.jsonl")
    assert json.loads((out / "export.json").read_text())["gates"] == record["gates"]
    assert (out / "model.onnx").is_file() and (out / "genai_config.json").is_file()
    assert not list(tmp_path.glob(".tmp-*"))

    # `tuneforge generate EXPORT --engine onnx` answers as `tuneforge generate RUN` does
    from tuneforge import api
    from tuneforge.export.onnx import generate

    prompts = ["Capital of Spain?", "Say bye"]
    assert generate(out, prompts, max_new_tokens=16, threads=1) == api.generate(tiny_runs[arch], prompts,
                                                                                 max_new_tokens=16)


def test_onnx_int8_export_passes_the_loss_gate(tiny_runs, tmp_path):
    from tuneforge.export import export_onnx

    record = export_onnx(tiny_runs["llama"], tmp_path / "int8", "int8", threads=1)
    loss = gate(record, "heldout_loss")
    assert record["passed"] and loss["passed"] and loss["detail"]["tolerance"] == 0.05
    assert "greedy_tokens" not in [g["name"] for g in record["gates"]]  # informational only at int8
    model = (tmp_path / "int8" / "model.onnx").read_bytes()
    assert b"MatMulNBits" in model  # really quantised


def test_export_that_dropped_the_adapter_fails_with_exit_3(tiny_runs, tmp_path, monkeypatch, capsys):
    """The export saves the base (peft's unload: adapter removed, not merged): the gates must refuse it."""
    from tuneforge import cli
    from tuneforge.export import onnx as onnx_export

    original = onnx_export.save_merged

    def drop_adapter(loaded, dest):
        loaded.model = loaded.model.unload()  # the base weights, as a buggy merge would leave them
        return original(loaded, dest)

    monkeypatch.setattr(onnx_export, "save_merged", drop_adapter)
    out = tmp_path / "broken"
    code = cli.main(["export", "onnx", str(tiny_runs["llama"]), "--out", str(out), "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 3
    assert "adapter_present" in err and "behaves like the base" in err and "greedy_tokens" in err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))  # nothing that looks deployable is left


def test_export_refuses_a_folder_it_did_not_make(tiny_runs, tmp_path, capsys):
    from tuneforge import cli

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code = cli.main(["export", "onnx", str(tiny_runs["llama"]), "--out", str(mine)])
    assert code == 1 and "did not make it" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"
    code = cli.main(["export", "onnx", str(tiny_runs["llama"]), "--out", str(tiny_runs["llama"] / "x")])
    assert code == 1 and "inside the run" in capsys.readouterr().err


def bpe_model(root: Path, arch: str) -> Path:
    """A tiny random `arch` model whose byte-level BPE tokenizer has real merges (GGUF needs them; the shared
    tiny tokenizer is bytes-only), trained on the chat fixtures' text."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from tuneforge.models.tiny import CHATML_TEMPLATE, make_config

    texts = [m["content"] for r in CHAT_RECORDS + HELD_OUT for m in r["messages"]] * 4
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    config = make_config(arch, len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(root / f"bpe-{arch}")
    tok.save_pretrained(root / f"bpe-{arch}")
    return root / f"bpe-{arch}"


@pytest.fixture(scope="session")
def bpe_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-runs")
    return {arch: train_run(bpe_model(root, arch), root, f"run-{arch}") for arch in ("llama", "phi3", "qwen2")}


@pytest.fixture
def bpe_llama_run(bpe_runs) -> Path:
    return bpe_runs["llama"]


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2"])
def test_gguf_f16_reads_back_with_equal_logits_and_tokens(bpe_runs, tmp_path, arch):
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.export import export_gguf
    from tuneforge.inference import load

    out = tmp_path / "model.gguf"
    record = export_gguf(bpe_runs[arch], out, "f16")
    assert record["passed"] and record["architecture"] == arch
    assert [g["name"] for g in record["gates"]] == ["tokenizer", "greedy_tokens", "heldout_loss", "adapter_present"]
    assert gate(record, "greedy_tokens")["detail"]["identical"] == len(HELD_OUT)
    assert gate(record, "tokenizer")["detail"]["chat_template_identical"]
    assert json.loads((tmp_path / "model.gguf.export.json").read_text())["passed"]

    # logits of the file (read back by transformers, q/k un-permuted) vs the run with its adapter applied
    run = load(bpe_runs[arch])
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    ids = torch.tensor([run.tokenizer.apply_chat_template([{"role": "user", "content": "Capital of Spain?"}],
                                                          add_generation_prompt=True, tokenize=True)["input_ids"]])
    with torch.no_grad():
        expected, got = run.model(input_ids=ids).logits, back(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=2e-3, rtol=1e-3), (got - expected).abs().max()


def test_gguf_q8_0_passes_the_loss_gate_and_replaces_only_its_own_file(bpe_llama_run, tmp_path, capsys):
    from tuneforge import cli

    out = tmp_path / "exports" / "new" / "model.gguf"  # its folder is made (it was a traceback)
    assert cli.main(["export", "gguf", str(bpe_llama_run), "--type", "q8_0", "--out", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert out.is_file() and sorted(p.name for p in out.parent.iterdir()) == ["model.gguf", "model.gguf.export.json"]
    assert record["passed"] and gate(record, "heldout_loss")["detail"]["tolerance"] == 0.05
    assert cli.main(["export", "gguf", str(bpe_llama_run), "--type", "q8_0", "--out", str(out)]) == 0  # replaced
    foreign = out.parent / "other.gguf"
    foreign.write_bytes(b"not ours")
    assert cli.main(["export", "gguf", str(bpe_llama_run), "--out", str(foreign)]) == 1
    assert "did not write it" in capsys.readouterr().err and foreign.read_bytes() == b"not ours"


def test_gguf_that_dropped_the_adapter_fails_and_is_kept_only_on_request(bpe_llama_run, tmp_path, monkeypatch,
                                                                        capsys):
    from tuneforge import cli
    from tuneforge.export import gguf

    monkeypatch.setattr(gguf, "merged_model", lambda loaded: loaded.model.unload())  # the base, adapter lost
    out = tmp_path / "broken.gguf"
    assert cli.main(["export", "gguf", str(bpe_llama_run), "--out", str(out), "--keep-failed"]) == 3
    err = capsys.readouterr().err
    assert "adapter_present" in err and "do not deploy it" in err and "Traceback" not in err
    record = json.loads((tmp_path / "broken.gguf.export.json").read_text())
    assert out.is_file() and record["passed"] is False
    assert gate(record, "tokenizer")["passed"] and not gate(record, "greedy_tokens")["passed"]
    assert gate(record, "adapter_present")["detail"]["export_agrees_with_base"] > 0


@pytest.mark.llamacpp
def test_gguf_runs_in_llama_cpp_with_the_same_greedy_tokens(bpe_llama_run, tmp_path):
    """llama.cpp itself (llama-cpp-python, built from source: `pytest -m llamacpp`, not part of `make test`)."""
    pytest.importorskip("llama_cpp")
    from tuneforge.export import export_gguf, gates
    from tuneforge.export.gguf import LlamaCppRunner
    from tuneforge.export.onnx import load_run, references
    from tuneforge.inference import stop_ids

    out = tmp_path / "model.gguf"
    export_gguf(bpe_llama_run, out, "f16")
    spec, loaded = load_run(bpe_llama_run)
    held, tuned, base = references(spec, loaded, None, 8, 32)
    exported = gates.run(LlamaCppRunner(out, threads=1), held, 32, stop_ids(loaded.tokenizer))
    results = {g.name: g for g in gates.evaluate(tuned, base, exported, "f16")}
    assert results["greedy_tokens"].passed, results["greedy_tokens"].message
    assert results["heldout_loss"].passed and results["adapter_present"].passed


def test_onnx_adapters_export_serves_two_adapters_and_the_base_from_one_graph(tiny_runs, tiny_models, tmp_path,
                                                                             capsys):
    """One base graph with LoRA inputs; two runs of different rank and targets added one after the other; each
    adapter (and the rank-0 base) hot-swapped in one loaded model gives its PyTorch model's greedy tokens."""
    from tuneforge import cli
    from tuneforge.export import gates
    from tuneforge.export.onnx import OnnxRunner, load_run, references
    from tuneforge.inference import stop_ids

    root = tiny_runs["llama"].parent
    second = root / "run-llama-r2"
    if not second.exists():
        import tuneforge

        spec = tiny_spec(tiny_models["llama"], root / "train.jsonl", second, max_steps=4, seed=7)
        spec["data"]["validation"] = str(root / "valid.jsonl")
        spec["adapter"] = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
        assert tuneforge.train(spec, progress=False).status == "succeeded"
    out = tmp_path / "adapters"
    for run, name in ((tiny_runs["llama"], "chat"), (second, "small")):
        assert cli.main(["export", "onnx", str(run), "--adapters", "--name", name, "--out", str(out),
                         "--threads", "1"]) == 0
    record = json.loads((out / "export.json").read_text())
    assert record["format"] == "onnx-adapters" and set(record["adapters"]) == {"base", "chat", "small"}
    assert record["adapters"]["chat"]["rank"] == 4 and record["adapters"]["small"]["rank"] == 2
    assert all(a["passed"] for a in record["adapters"].values())
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    lora_inputs = [i.name for i in graph.input if ".lora_" in i.name]
    assert len(lora_inputs) == 2 * 7 * 2 and not [t for t in graph.initializer if ".lora_" in t.name]

    runner = OnnxRunner(out, threads=1)
    for name in ("base", "chat", "small"):
        runner.load_adapter(name, out / "adapters" / f"{name}.onnx_adapter")
    for name, run in (("chat", tiny_runs["llama"]), ("small", second)):
        spec, loaded = load_run(run)
        held, tuned, base = references(spec, loaded, None, 4, 24, base_greedy=True)
        stops = stop_ids(loaded.tokenizer)
        for adapter, expected in ((name, tuned), ("base", base)):
            runner.use(adapter)
            got = [runner.greedy(p, 24, stops) for p in held.prompts]
            assert got == expected.greedy, adapter
        assert tuned.greedy != base.greedy  # the adapters matter on these prompts
    capsys.readouterr()
    # an adapter of another base is refused, naming the reason
    code = cli.main(["export", "onnx", str(tiny_runs["phi3"]), "--adapters", "--out", str(out)])
    assert code == 1 and "differ from the base" in capsys.readouterr().err
