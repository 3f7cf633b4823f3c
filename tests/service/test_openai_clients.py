"""What real clients send `tuneforge serve` (issue #29), through a real server and the openai SDK in strict mode:
log-probabilities (chat and completions, streamed and not), echo with prompt log-probabilities equal to the
run's teacher-forced ones, token-id prompts, json_schema outputs that always validate, tool calls of a run
fine-tuned on the shipped tool scenario (parsed, streamed, schema-valid), and the load testers' extensions.
lm-evaluation-harness itself runs in tests/service/test_lm_eval.py (opt-in: -m lmeval)."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.service.conftest import Server
from tuneforge.data.tool_calls import TOOLS

ROOT = Path(__file__).resolve().parents[2]
TIMER = next(t for t in TOOLS if t["function"]["name"] == "set_timer")


@pytest.fixture(scope="module")
def tools_run(tmp_path_factory) -> Path:
    """A tiny model fine-tuned a few steps on the shipped tool scenario with examples/tools.yaml's template (its
    prompts, tool definitions included, are ~1,400 byte tokens: the model takes 2,048)."""
    from tuneforge import api
    from tuneforge.data.tool_calls import write_tool_dataset
    from tuneforge.models.tiny import make_tiny_model
    from tuneforge.spec import load_spec

    root = tmp_path_factory.mktemp("tools")
    base = make_tiny_model("llama", root / "llama", max_position_embeddings=2048)
    data = write_tool_dataset(root / "data", n_train=40, n_heldout=8, n_valid=4)
    template = load_spec(ROOT / "examples" / "tools.yaml").data.chat_template
    api.train({"model": str(base), "task": "chat", "data": {"train": str(data["train"]), "chat_template": template},
               "method": "lora", "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
               "training": {"batch_size": 4, "lr": 1e-2, "precision": "fp32", "max_seq_len": 1536, "max_steps": 4,
                            "eval_every": 1000, "save_every": 1000},
               "device": "cpu", "output_dir": str(root / "run")}, progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def server(service_model, tools_run, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("clients") / "data", service_model, None, workers=0,
                 extra=["--inference-threads", "1", "--adapter", f"tools={tools_run}"])
    srv.start()
    yield srv
    srv.stop()


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {server.key('acme')}"})


def test_chat_logprobs_whole_and_streamed(server):
    client = server.client()
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6, temperature=0,
              logprobs=True, top_logprobs=3)
    reply = client.chat.completions.create(**kw)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    assert all(len(e.top_logprobs) == 3 and e.logprob == e.top_logprobs[0].logprob for e in content)  # greedy
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == reply.choices[0].message.content
    streamed = [e for c in client.chat.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]


def test_echo_logprobs_equal_the_runs_teacher_forced_ones(server, tools_run):
    """Completions with echo score a prompt (max_tokens 0) as the run itself does in-process, within 1e-4 (fp32);
    prompts may be token ids, one list or several."""
    import torch

    from tuneforge import api

    loaded = api.load(tools_run)
    tok = loaded.tokenizer
    texts = ["Set a timer for 5 minutes.", "Convert 10 EUR to USD."]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    with torch.no_grad():
        want = [torch.log_softmax(loaded.model(torch.tensor([p])).logits[0, :-1].float(), -1)
                .gather(1, torch.tensor(p[1:])[:, None])[:, 0].tolist() for p in ids]
    for prompt in (texts, ids, ids[0]):
        got = post(server, "/completions", {"model": "tools", "prompt": prompt, "echo": True, "max_tokens": 0,
                                            "logprobs": 1, "temperature": 0}).json()
        for choice, expected, text in zip(got["choices"], want, texts):
            lp = choice["logprobs"]
            assert choice["text"] == text and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
            assert len(lp["tokens"]) == len(lp["text_offset"]) == len(expected) + 1
    # lm-eval's request: max_tokens 1, the prompt's entries then the generated token's
    got = post(server, "/completions", {"model": "tools", "prompt": ids, "echo": True, "max_tokens": 1,
                                        "logprobs": 1, "temperature": 0}).json()
    assert [len(c["logprobs"]["token_logprobs"]) for c in got["choices"]] == [len(p) + 1 for p in ids]
    bad = post(server, "/completions", {"model": "tools", "prompt": [10**6], "max_tokens": 1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,10}$"}, "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "unit": {"enum": ["celsius", "fahrenheit"]}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["city", "days", "unit", "tags"], "additionalProperties": False}


def test_json_schema_outputs_always_parse_and_validate(server):
    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA, "strict": True}}
    for temperature in (0.0, 0.8, 1.5):
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                               response_format=fmt, temperature=temperature, seed=7, n=3,
                                               max_tokens=200)
        for choice in reply.choices:
            assert choice.finish_reason == "stop", choice
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON"}], seed=1,
                                           response_format={"type": "json_object"}, max_tokens=300, temperature=0)
    assert reply.choices[0].finish_reason == "length" or isinstance(json.loads(reply.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}})
    assert e.value.body["param"] == "response_format.json_schema.schema"


def test_tool_calls_round_trip(server):
    """A run fine-tuned with a template that renders tools: required and named tool choice give parsed calls whose
    arguments follow the function's schema, finish_reason tool_calls, the same call streamed as delta.tool_calls."""
    client = server.client()
    messages = [{"role": "user", "content": "Set a timer for 12 minutes for the tea."}]
    for choice in ("required", {"type": "function", "function": {"name": "set_timer"}}):
        reply = client.chat.completions.create(model="tools", messages=messages, tools=TOOLS, tool_choice=choice,
                                               parallel_tool_calls=False, temperature=0, max_tokens=300)
        (call,) = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and call.id.startswith("call_")
        function = next(t["function"] for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), function["parameters"])
    assert call.function.name == "set_timer"
    chunks = list(client.chat.completions.create(model="tools", messages=messages, tools=TOOLS, tool_choice=choice,
                                                 temperature=0, max_tokens=300, stream=True))
    deltas = [t for c in chunks if c.choices and c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [
        (0, call.function.name, call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The call goes back with its result: the conversation renders and the model answers.
    follow = messages + [{"role": "assistant", "tool_calls": [call.model_dump()]},
                         {"role": "tool", "tool_call_id": call.id, "content": '{"status": "started"}'}]
    assert client.chat.completions.create(model="tools", messages=follow, tools=TOOLS, tool_choice="none",
                                          max_tokens=4, temperature=0).choices[0].finish_reason in ("stop", "length")
    # A model whose template cannot show tools is refused, naming the field.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=messages, tools=[TIMER], tool_choice="required")
    assert e.value.body["param"] == "tools"


def test_load_tester_extensions_and_unknown_fields(server):
    """guidellm's streamed requests: ignore_eos runs to max_tokens, continuous_usage_stats puts the usage so far in
    every chunk; min_tokens holds the stop back; any other unknown field is still a 400."""
    body = {"model": "tiny", "prompt": "Once upon", "max_tokens": 12, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", f"{server.url}/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {server.key('acme')}"}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert all(c["usage"] is not None for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    completions = [c["usage"]["completion_tokens"] for c in chunks]
    assert completions == sorted(completions)
    reply = post(server, "/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 5, "min_tokens": 5, "temperature": 0}).json()
    assert reply["usage"]["completion_tokens"] == 5
    refused = post(server, "/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                 "best_effort": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "best_effort"
