"""Chat completions and completions from `tuneforge serve`, through the openai SDK in strict mode: base models,
fine-tuned models and checkpoints of the jobs API, CLI-trained runs given with --adapter, streaming and
usage, greedy output equal to `tuneforge generate`, org rules, busy and disconnected clients."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import CHAT_RECORDS, tiny_spec, write_jsonl
from tests.service.conftest import Server, tiny_job, wait_for

PROMPTS = ["Say hi", "Capital of France?", "Count to three"]


@pytest.fixture(scope="module")
def runs(service_model, tmp_path_factory) -> dict[str, Path]:
    """Finished CLI runs of each method on the tiny model, and a merged model."""
    from tuneforge import api

    root = tmp_path_factory.mktemp("served-runs")
    data = write_jsonl(root / "train.jsonl", CHAT_RECORDS)
    out = {}
    for method in ("lora", "dora", "ia3", "prompt_tuning", "full"):
        spec = tiny_spec(service_model, data, root / method, max_steps=4, lr=5e-2)
        spec["method"] = method
        api.train(spec, progress=False)
        out[method] = root / method
    out["merged"] = api.merge(out["lora"], root / "merged")
    return out


@pytest.fixture(scope="module")
def server(service_model, runs, tmp_path_factory):
    from tuneforge.models.tiny import make_tiny_model

    # A base with a long context that never says a stop token (its output rows for the special tokens are zero,
    # so greedy decoding always prefers a byte): requests that keep decoding until their client goes away.
    long = make_tiny_model("llama", tmp_path_factory.mktemp("long") / "llama", max_position_embeddings=65536)
    _never_stop(long)
    adapters = [a for name, run in runs.items() if name != "prompt_tuning" for a in ("--adapter", f"op-{name}={run}")]
    adapters += ["--base-model", f"tiny={service_model}", "--base-model", f"long={long}"]
    srv = Server(tmp_path_factory.mktemp("inference") / "data", service_model, None, workers=1,
                 extra=["--max-batch", "2", "--max-queue", "1", "--inference-threads", "1", *adapters])
    srv.start()
    yield srv
    srv.stop()


def _never_stop(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.get_output_embeddings().weight[256:] = 0  # byte tokens are 0..255; the rest are special
    model.save_pretrained(folder)


STARTUP = """
import json, sys
from fastapi.testclient import TestClient
from tuneforge.service.app import create_app
from tuneforge.service.auth import create_key
from tuneforge.service.settings import ServiceSettings

settings = ServiceSettings(data_dir=sys.argv[1], base_models={"tiny": sys.argv[2]}, adapters={"served-lora": sys.argv[3]})
app = create_app(settings)
key = create_key(app.state.store, settings.pepper(), "acme")
with TestClient(app) as client:
    health = client.get("/health").json()
    models = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
heavy = [m for m in ("torch", "transformers", "peft", "onnxruntime", "onnxruntime_genai", "llguidance") if m in sys.modules]
print(json.dumps({"health": health, "models": sorted(m["id"] for m in models["data"]), "heavy": heavy}))
"""


def test_the_api_process_starts_without_the_inference_stack(service_model, runs, tmp_path):
    """`tuneforge serve` answers health and model lists before any model is asked for, without importing torch,
    transformers, peft or ONNX Runtime (a second to start, ~110 MB): they load with the first model."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", STARTUP, str(tmp_path / "data"), str(service_model), str(runs["lora"])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["health"] == {"status": "ok", "active": 0, "waiting": 0}
    assert {"tiny", "served-lora"} <= set(answer["models"])
    assert answer["heavy"] == []


def chat(client, model, prompt, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          **{"temperature": 0, **kw})


@pytest.mark.parametrize("method", ["lora", "full", "merged"])
def test_greedy_output_equals_tuneforge_generate(server, runs, method):
    from tuneforge import api

    client = server.client()
    want = api.generate(runs[method], PROMPTS, max_new_tokens=10)
    got = [chat(client, f"op-{method}", p, max_tokens=10).choices[0].message.content.strip() for p in PROMPTS]
    assert got == want


def test_fine_tuned_model_and_checkpoint_from_the_jobs_api(server, train_jsonl):
    from tuneforge import api
    from tuneforge.data.encode import encode_prompt
    from tuneforge.models import load_tokenizer

    client = server.client("acme")
    with open(train_jsonl, "rb") as f:
        file_id = client.files.create(file=f, purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model="tiny", training_file=file_id, suffix="srv",
                                         extra_body=tiny_job(max_steps=4, save_every=2))
    done = wait_for(client, job.id, ("succeeded",))
    run = server.data_dir / "jobs" / job.id / "run"
    ckpt = f"{done.fine_tuned_model}:ckpt-step-2"
    assert ckpt in [c.fine_tuned_model_checkpoint for c in client.fine_tuning.jobs.checkpoints.list(job.id)]

    tok = load_tokenizer(run / "adapter")
    messages = [{"role": "user", "content": PROMPTS[0]}]
    prompt_tokens = len(encode_prompt(tok, "chat", {"messages": messages}))
    for model in ("tiny", done.fine_tuned_model, ckpt):
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=7, temperature=0)
        assert reply.model == model and reply.object == "chat.completion"
        assert reply.usage.prompt_tokens == prompt_tokens
        if reply.choices[0].finish_reason == "length":
            assert reply.usage.completion_tokens == 7
        # Streamed: the same text in pieces, then one usage chunk.
        chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=7, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens
    assert chat(client, done.fine_tuned_model, PROMPTS[1], max_tokens=8).choices[0].message.content.strip() == \
        api.generate(run, [PROMPTS[1]], max_new_tokens=8)[0]

    completion = client.completions.create(model=done.fine_tuned_model, prompt=["Once upon", "A"], max_tokens=5,
                                           temperature=0, n=2)
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert completion.choices[0].text == completion.choices[1].text  # greedy: n copies agree
    # Streamed completions: OpenAI's (and vLLM's) chunks carry finish_reason null until the last, which the SDK's
    # CompletionChoice type does not allow (it is not Optional there), so this one reads with a lenient client.
    lenient = server.client("acme", strict=False)
    chunks = [c.choices[0] for c in lenient.completions.create(model="tiny", prompt="Once upon", max_tokens=6,
                                                                stream=True, temperature=0)]
    assert [c.finish_reason for c in chunks][-1] == "length" and all(c.finish_reason is None for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == client.completions.create(model="tiny", prompt="Once upon", max_tokens=6,
                                                                        temperature=0).choices[0].text

    other = server.client("someone-else")
    for model in (done.fine_tuned_model, ckpt):
        with pytest.raises(openai.NotFoundError):
            chat(other, model, "hi", max_tokens=2)
    assert chat(other, "op-lora", "hi", max_tokens=2).choices  # the operator's adapters serve every org


def test_dora_ia3_served_merged_and_prompt_tuning_refused(server, runs, service_model, tmp_path):
    client = server.client()
    for model in ("op-dora", "op-ia3"):
        assert chat(client, model, PROMPTS[0], max_tokens=4).usage.completion_tokens >= 1
    # An operator's prompt-tuning run stops the start with one line (it would fail every request)...
    refused = Server(tmp_path / "data", service_model, None, workers=0,
                     extra=["--adapter", f"op-pt={runs['prompt_tuning']}"])
    with pytest.raises(RuntimeError, match="exited with 2") as e:
        refused.start()
    assert "--adapter 'op-pt=" in str(e.value) and "prompt-tuning adapters are not served" in str(e.value)
    assert "Traceback" not in str(e.value)
    # ...and a job's prompt-tuning model is answered 400 with the reason, without the server's paths.
    from tuneforge.errors import ModelError
    from tuneforge.service.errors import without_server_paths
    from tuneforge.serving.registry import run_target

    with pytest.raises(ModelError, match="prompt-tuning") as e:
        run_target(runs["prompt_tuning"], "ft:tiny:acme::1234")
    assert str(runs["prompt_tuning"]) not in without_server_paths(str(e.value))


def test_unsupported_parameters_are_refused(server):
    client = server.client()
    for kw, param in (({"logit_bias": {"1": 5}}, "logit_bias"), ({"presence_penalty": 0.5}, "presence_penalty"),
                      ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                      ({"n": 9}, "n"), ({"temperature": 3}, "temperature")):
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, "tiny", "hi", **kw)
        assert e.value.body["param"] == param, e.value.body


def test_disconnected_clients_free_their_slots_and_a_full_queue_answers_429(server):
    url, key = server.url, server.key("acme")
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "long", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60000, "stream": True,
            "temperature": 0}
    # Two endless streams fill the batch (--max-batch 2); a third waits (--max-queue 1); a fourth is refused.
    health = url.removesuffix("/v1") + "/health"

    def busy() -> dict:
        return {k: v for k, v in httpx.get(health).json().items() if k != "status"}

    def wait_until(condition) -> None:
        deadline = time.time() + 30
        while not condition() and time.time() < deadline:
            time.sleep(0.02)

    streams = []
    for n in (1, 2):
        client = httpx.Client(timeout=60)
        response = client.send(client.build_request("POST", f"{url}/chat/completions", json=body, headers=headers),
                               stream=True)
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()  # kept: a dropped iterator closes the stream, which is a disconnect
        next(lines)
        streams.append((client, response, lines))
        wait_until(lambda: busy() == {"active": n, "waiting": 0})  # decoding, not waiting: the queue is free
    waiting = {}

    def third():
        waiting["reply"] = httpx.post(f"{url}/chat/completions", headers=headers, timeout=60,
                                      json={**body, "stream": False, "max_tokens": 3})

    thread = threading.Thread(target=third)
    thread.start()
    wait_until(lambda: busy()["waiting"] >= 1)
    assert busy() == {"active": 2, "waiting": 1}
    refused = httpx.post(f"{url}/chat/completions", headers=headers, json={**body, "stream": False}, timeout=60)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    started = time.time()
    for client, response, _ in streams:  # the clients go away mid-stream
        response.close()
        client.close()
    thread.join(30)
    assert waiting["reply"].status_code == 200 and time.time() - started < 15
