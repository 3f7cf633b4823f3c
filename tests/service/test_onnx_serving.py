"""ONNX exports served by `tuneforge serve --adapter NAME=EXPORT` (serving/onnx_engine.py), through the openai
SDK in strict mode: a merged fp32 export answers with the greedy tokens of `tuneforge generate --engine onnx`
and of the PyTorch run; an adapters export serves NAME:ADAPTER per adapter, each with its own tokens;
streaming, completions, n > 1, seeded sampling, 404s, and broken export folders refused at start."""
from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from tests.conftest import tiny_spec
from tests.service.conftest import Server

pytest.importorskip("onnxruntime_genai")

PROMPTS = ["Say hi", "Capital of Spain?"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def exports(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Two tiny Llama LoRA runs (different rank, targets and seed), a merged fp32 export of the first and one
    adapters export holding both (gates on 2 prompts only: the export tests check the gates themselves)."""
    import tuneforge
    from tests.integration.test_export import train_run
    from tuneforge.export import export_onnx, export_onnx_adapter

    root = tmp_path_factory.mktemp("onnx-serving")
    chat = train_run(tiny_models["llama"], root, "run-chat")
    spec = tiny_spec(tiny_models["llama"], root / "train.jsonl", root / "run-small", max_steps=4, seed=7)
    spec["data"]["validation"] = str(root / "valid.jsonl")
    spec["adapter"] = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    assert tuneforge.train(spec, progress=False).status == "succeeded"
    small = root / "run-small"
    quick = {"threads": 1, "prompts": 2, "max_new_tokens": 8}
    export_onnx(chat, root / "merged", "fp32", **quick)
    export_onnx_adapter(chat, root / "adapters", "fp32", name="chat", **quick)
    export_onnx_adapter(small, root / "adapters", name="small", **quick)
    return {"run-chat": chat, "run-small": small, "merged": root / "merged", "adapters": root / "adapters",
            "base": tiny_models["llama"]}


@pytest.fixture(scope="module")
def server(exports, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("onnx-serve") / "data", exports["base"], None, workers=0,
                 extra=["--inference-threads", "1", "--max-batch", "4", "--adapter", f"m={exports['merged']}",
                        "--adapter", f"lo={exports['adapters']}", "--adapter", f"pt={exports['run-chat']}",
                        "--adapter", f"pt-small={exports['run-small']}"])
    srv.start()
    yield srv
    srv.stop()


def chat(client, model, prompt, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          **{"temperature": 0, "max_tokens": MAX_TOKENS, **kw})


def test_merged_export_answers_with_the_tokens_of_generate_and_of_the_pytorch_run(server, exports):
    from tuneforge import api
    from tuneforge.export.onnx import generate

    client = server.client()
    onnx = [chat(client, "m", p) for p in PROMPTS]
    torch_served = [chat(client, "pt", p) for p in PROMPTS]
    got = [r.choices[0].message.content for r in onnx]
    assert [g.strip() for g in got] == generate(exports["merged"], PROMPTS, max_new_tokens=MAX_TOKENS, threads=1)
    assert [g.strip() for g in got] == api.generate(exports["run-chat"], PROMPTS, max_new_tokens=MAX_TOKENS)
    assert got == [r.choices[0].message.content for r in torch_served]  # the same tokens, unstripped
    assert [r.usage for r in onnx] == [r.usage for r in torch_served]
    assert onnx[0].model == "m" and onnx[0].choices[0].finish_reason in ("stop", "length")

    # seeded sampling uses tuneforge's sampler on the export's logits: reproducible, and the PyTorch model's draw
    sampled = [chat(client, model, PROMPTS[0], temperature=1.0, top_p=0.9, seed=5).choices[0].message.content
               for model in ("m", "m", "pt")]
    assert sampled[0] == sampled[1] == sampled[2]
    assert chat(client, "m", PROMPTS[0], temperature=1.0, seed=6).choices[0].message.content != sampled[0]


def test_adapters_export_serves_each_adapter_under_its_own_name(server, exports):
    from tuneforge.export.onnx import generate

    client = server.client()
    ids = [m.id for m in client.models.list().data]
    assert {"m", "lo:base", "lo:chat", "lo:small"} <= set(ids) and "lo" not in ids
    assert client.models.retrieve("lo:small").owned_by == "tuneforge"
    answers = {}
    for adapter in ("chat", "small", "base"):
        answers[adapter] = [chat(client, f"lo:{adapter}", p).choices[0].message.content for p in PROMPTS]
        assert [a.strip() for a in answers[adapter]] == generate(exports["adapters"], PROMPTS, adapter=adapter,
                                                                 max_new_tokens=MAX_TOKENS, threads=1), adapter
    assert answers["chat"] != answers["small"] != answers["base"] != answers["chat"]
    for adapter, run in (("chat", "pt"), ("small", "pt-small")):  # each adapter = its PyTorch run, token for token
        assert answers[adapter] == [chat(client, run, p).choices[0].message.content for p in PROMPTS]

    # streamed: the same text in pieces, usage last; n=2 decodes two generators side by side
    reply = chat(client, "lo:small", PROMPTS[0])
    chunks = list(client.chat.completions.create(model="lo:small", messages=[{"role": "user", "content": PROMPTS[0]}],
                                                 temperature=0, max_tokens=MAX_TOKENS, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and len(chunks) > 4
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens
    both = chat(client, "lo:chat", PROMPTS[1], n=2)
    assert [c.message.content for c in both.choices] == [answers["chat"][1]] * 2
    completion = client.completions.create(model="lo:chat", prompt="Once upon", max_tokens=5, temperature=0)
    lenient = server.client(strict=False)
    streamed = [c.choices[0].text for c in lenient.completions.create(model="lo:chat", prompt="Once upon",
                                                                        max_tokens=5, temperature=0, stream=True)]
    assert "".join(streamed) == completion.choices[0].text and completion.usage.completion_tokens == 5


def test_unknown_models_and_bad_requests_get_the_usual_errors(server):
    client = server.client()
    for model in ("lo", "lo:nope", "m:chat"):
        with pytest.raises(openai.NotFoundError) as e:
            chat(client, model, "hi")
        assert e.value.body["param"] == "model" and e.value.body["code"] == "not_found", e.value.body
    reply = chat(client, "lo:chat", "hi", logprobs=True, top_logprobs=2, max_tokens=3)  # sampled tokens: any engine
    assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as e:  # prompt log-probabilities: GenAI gives the last position's only
        client.completions.create(model="lo:chat", prompt="hi", echo=True, logprobs=1, max_tokens=1)
    assert e.value.body["param"] == "echo"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "m", "hi", max_tokens=100_000)
    assert e.value.body["code"] == "context_length_exceeded"


def _fake_export(folder: Path, record: dict, genai: dict | None = None) -> Path:
    folder.mkdir()
    (folder / "export.json").write_text(json.dumps(record))
    if genai is not None:
        (folder / "genai_config.json").write_text(json.dumps(genai))
    return folder


def test_a_broken_export_stops_the_start_with_one_line(exports, tmp_path, capsys):
    from tuneforge import cli

    cases = {
        "incomplete": (_fake_export(tmp_path / "a", {"format": "onnx", "passed": True}), "not a complete ONNX export"),
        "gguf": (_fake_export(tmp_path / "b", {"format": "gguf"}, {}), "is a gguf export"),
        "failed": (_fake_export(tmp_path / "c", {"format": "onnx", "passed": False}, {}), "failed its export gates"),
        "genai": (_fake_export(tmp_path / "d", {"format": "onnx", "passed": True}, {}), "ONNX Runtime GenAI cannot"),
        "adapter file": (_fake_export(tmp_path / "e", {"format": "onnx-adapters", "adapters": {
            "x": {"file": "adapters/x.onnx_adapter", "passed": True}}}, {}), "adapter(s) x is missing"),
        "unreadable": (_fake_export(tmp_path / "f", {}, {}), "export.json is unreadable"),
    }
    (tmp_path / "f" / "export.json").write_text("{not json")
    for case, (folder, expected) in cases.items():
        code = cli.main(["serve", "--data-dir", str(tmp_path / "data"), "--adapter", f"x={folder}"])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (case, err)
        assert "Traceback" not in err
    code = cli.main(["serve", "--data-dir", str(tmp_path / "data"), "--adapter", f"a:b={exports['adapters']}"])
    assert code == 2 and "may not hold ':'" in capsys.readouterr().err
