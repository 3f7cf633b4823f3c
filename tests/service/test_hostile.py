"""What a hostile or careless client sends, answered in-process (no workers, no training): every case a 4xx in the
error envelope that names the field, never a 5xx. The table (`REQUESTS`) is also what bench/bad_inputs.py sends a
real `tuneforge serve`, where it counts 5xx answers and tracebacks in the server's log.

Each case: (id, method, path, body or raw bytes, extra headers, expected status, expected param, phrase).
`{file}`, `{job}` and `{queued}` / `{cancelled}` in paths and bodies are filled in from objects the fixture made."""
from __future__ import annotations

import json

import pytest

from tests.conftest import CHAT_RECORDS

NESTED_900 = "[" * 900 + "]" * 900
JSON = {"content-type": "application/json"}


def job(**extra) -> dict:
    return {"model": "tiny", "training_file": "{file}", **extra}


def chat(**extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


JOBS = "/v1/fine_tuning/jobs"
CHAT = "/v1/chat/completions"
REQUESTS = [
    # size and shape of the body
    ("job-nested-900-deep", "POST", JOBS, ('{"model": "tiny", "training_file": "{file}", "tuneforge": {"x": %s}}'
                                            % NESTED_900).encode(), JSON, 400, None, "deeper than 64"),
    ("chat-nested-900-deep", "POST", CHAT, ('{"model": "tiny", "messages": %s}' % NESTED_900).encode(), JSON, 400,
     None, "deeper than 64"),
    ("job-body-9-mib", "POST", JOBS, job(metadata={"a": "x" * (9 * 2**20)}), {}, 413, None, "larger than"),
    ("job-not-json", "POST", JOBS, b"{not json", JSON, 400, None, "not valid JSON"),
    ("chat-not-json", "POST", CHAT, b'{"model": "tiny", "messages": [}', JSON, 400, None, "not valid JSON"),
    # what one job may use
    ("job-64-ranks", "POST", JOBS, job(tuneforge={"distributed": {"strategy": "ddp", "nproc": 64}}), {}, 400,
     "tuneforge.distributed.nproc", "--max-job-ranks"),
    ("job-2-nodes", "POST", JOBS, job(tuneforge={"distributed": {"strategy": "ddp", "nnodes": 2}}), {}, 400,
     "tuneforge.distributed.nnodes", "this server's machine"),
    ("job-master-port", "POST", JOBS, job(tuneforge={"distributed": {"master_port": 22}}), {}, 400,
     "tuneforge.distributed.master_port", "free port"),
    ("job-deepspeed-config-path", "POST", JOBS,
     job(tuneforge={"distributed": {"backend": "deepspeed", "deepspeed_config": "/etc/passwd"}}), {}, 400,
     "tuneforge.distributed.deepspeed_config", "operator"),
    ("job-token-budget", "POST", JOBS, job(hyperparameters={"n_epochs": 50},
                                          tuneforge={"training": {"max_seq_len": 1 << 20}}), {}, 400,
     "hyperparameters.n_epochs", "--max-job-tokens"),
    ("job-max-steps-budget", "POST", JOBS, job(tuneforge={"training": {"max_steps": 10**9}}), {}, 400,
     "tuneforge.training.max_steps", "--max-job-tokens"),
    # every number bounded, in OpenAI's terms
    ("job-lr-multiplier-1e308", "POST", JOBS, job(hyperparameters={"learning_rate_multiplier": 1e308}), {}, 400,
     "hyperparameters.learning_rate_multiplier", "at most 10"),
    ("job-lr-multiplier-nested", "POST", JOBS, job(method={"type": "supervised", "supervised": {"hyperparameters": {
        "learning_rate_multiplier": -1}}}), {}, 400, "method.supervised.hyperparameters.learning_rate_multiplier",
     "above 0"),
    ("job-n-epochs-word", "POST", JOBS, job(hyperparameters={"n_epochs": "many"}), {}, 400,
     "hyperparameters.n_epochs", 'a whole number from 1 to 50, or "auto"'),
    ("job-batch-size-huge", "POST", JOBS, job(hyperparameters={"batch_size": 2**70}), {}, 400,
     "hyperparameters.batch_size", "from 1 to 256"),
    ("job-spec-lr-1e308", "POST", JOBS, job(tuneforge={"training": {"lr": 1e308}}), {}, 400,
     "tuneforge.training.lr", "less than or equal to 10"),
    ("job-seed-2-70", "POST", JOBS, job(seed=2**70), {}, 400, "seed", "less than or equal"),
    ("chat-stop-10", "POST", CHAT, chat(stop=[f"s{i}" for i in range(10)]), {}, 400, "stop", "at most 4"),
    ("chat-stop-number", "POST", CHAT, chat(stop=7), {}, 400, "stop", "a string or a list"),
    ("chat-seed-2-70", "POST", CHAT, chat(seed=2**70), {}, 400, "seed", "less than or equal"),
    ("chat-presence-1e308", "POST", CHAT, chat(presence_penalty=1e308), {}, 400, "presence_penalty", "2"),
    ("chat-logprobs-huge", "POST", CHAT, chat(top_logprobs=10**30), {}, 400, "top_logprobs", "20"),
    ("chat-max-tokens-2-70", "POST", CHAT, chat(max_tokens=2**70), {}, 400, "max_tokens", "less than or equal"),
    ("chat-n-100", "POST", CHAT, chat(n=100), {}, 400, "n", "less than or equal to 8"),
    ("completion-seed-negative-huge", "POST", "/v1/completions", {"model": "tiny", "prompt": "a", "seed": -2**70},
     {}, 400, "seed", "greater than or equal"),
    ("completion-token-id-2-40", "POST", "/v1/completions", {"model": "tiny", "prompt": [1, 2**40]}, {}, 400, "prompt",
     "token ids are from 0"),
    ("completion-token-id-past-vocab", "POST", "/v1/completions", {"model": "tiny", "prompt": [[1], [10**6]]}, {}, 400,
     "prompt", "below"),
    ("completion-65-prompts", "POST", "/v1/completions", {"model": "tiny", "prompt": ["a"] * 65}, {}, 400, "prompt",
     "at most 64"),
    ("completion-prompt-mixed", "POST", "/v1/completions", {"model": "tiny", "prompt": [1, "a"]}, {}, 400, "prompt",
     "list of token ids"),
    ("completion-logprobs-21", "POST", "/v1/completions", {"model": "tiny", "prompt": "a", "logprobs": 21}, {}, 400,
     "logprobs", "20"),
    ("completion-max-tokens-negative", "POST", "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": -1},
     {}, 400, "max_tokens", "greater than or equal to 0"),
    ("chat-min-tokens-2-70", "POST", CHAT, chat(min_tokens=2**70), {}, 400, "min_tokens", "less than or equal"),
    ("chat-top-logprobs-alone", "POST", CHAT, chat(top_logprobs=3), {}, 400, "top_logprobs", "logprobs to true"),
    ("chat-tool-choice-without-tools", "POST", CHAT, chat(tool_choice="required"), {}, 400, "tool_choice",
     "only allowed when tools"),
    ("chat-tool-name-bad", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "a b"}}]), {}, 400,
     "tools.0.function.name", "pattern"),
    ("chat-129-tools", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]),
     {}, 400, "tools", "at most 128"),
    ("chat-response-format-unknown", "POST", CHAT, chat(response_format={"type": "yaml"}), {}, 400, "response_format",
     None),
    ("chat-stream-options-unknown", "POST", CHAT, chat(stream=True, stream_options={"everything": True}), {}, 400,
     "stream_options.everything", None),
    # names and states
    ("job-suffix-path-and-controls", "POST", JOBS, job(suffix="../../e x\n\u202eyz"), {}, 400, "suffix",
     "letters, digits"),
    ("job-suffix-65", "POST", JOBS, job(suffix="a" * 65), {}, 400, "suffix", "1 to 64"),
    ("job-eval-data", "POST", JOBS, job(validation_file="{file}", tuneforge={"eval": {"data": "/etc/passwd"}}), {}, 400,
     "tuneforge.eval.data", "validation_file"),
    ("job-eval-without-validation-file", "POST", JOBS, job(tuneforge={"eval": {"before_after": True}}), {}, 400,
     "validation_file", "give its id as `validation_file`"),
    ("job-eval-not-an-object", "POST", JOBS, job(validation_file="{file}", tuneforge={"eval": "yes"}), {}, 400,
     "tuneforge.eval", "before_after"),
    ("job-eval-max-new-tokens-1e9", "POST", JOBS, job(validation_file="{file}", tuneforge={"eval": {
        "max_new_tokens": 10**9}}), {}, 400, "tuneforge.eval.max_new_tokens", "1 to 256"),
    ("job-eval-max-new-tokens-0", "POST", JOBS, job(validation_file="{file}", tuneforge={"eval": {
        "max_new_tokens": 0}}), {}, 400, "tuneforge.eval.max_new_tokens", "1 to 256"),
    ("job-eval-examples-negative", "POST", JOBS, job(validation_file="{file}", tuneforge={"eval": {"examples": -1}}),
     {}, 400, "tuneforge.eval.examples", "0 to 20"),
    ("job-eval-examples-21", "POST", JOBS, job(validation_file="{file}", tuneforge={"eval": {"examples": 21}}), {},
     400, "tuneforge.eval.examples", "0 to 20"),
    ("job-eval-before-after-word", "POST", JOBS, job(validation_file="{file}", tuneforge={"eval": {
        "before_after": "sometimes"}}), {}, 400, "tuneforge.eval.before_after", "boolean"),
    ("job-eval-unknown-key", "POST", JOBS, job(validation_file="{file}", tuneforge={"eval": {"generate_n": 5}}), {},
     400, "tuneforge.eval.generate_n", "before_after"),
    ("job-trust-remote-code", "POST", JOBS, job(tuneforge={"trust_remote_code": True}), {}, 400,
     "tuneforge.trust_remote_code", "never runs code"),
    ("job-output-dir", "POST", JOBS, job(tuneforge={"output_dir": "/tmp/x"}), {}, 400, "tuneforge.output_dir",
     "run folder"),
    ("resume-queued-job", "POST", JOBS + "/{queued}/resume", None, {}, 400, "fine_tuning_job_id",
     "only a paused job can be resumed"),
    ("pause-cancelled-job", "POST", JOBS + "/{cancelled}/pause", None, {}, 400, "fine_tuning_job_id",
     "cannot be paused"),
    ("cancel-cancelled-job", "POST", JOBS + "/{cancelled}/cancel", None, {}, 400, "fine_tuning_job_id",
     "cannot be cancelled"),
    # keys: the scheme is required and case-insensitive
    ("key-without-scheme", "GET", "/v1/models", None, {"authorization": "{key}"}, 401, None, "Bearer"),
    ("key-lowercase-scheme", "GET", "/v1/models", None, {"authorization": "bearer {key}"}, 200, None, None),
    ("key-uppercase-scheme", "GET", "/v1/models", None, {"authorization": "BEARER {key}"}, 200, None, None),
    ("key-basic-scheme", "GET", "/v1/models", None, {"authorization": "Basic {key}"}, 401, None, "Bearer"),
]


def fill(text: str, names: dict[str, str]) -> str:
    """`{name}` placeholders in a path, a header or a body's JSON text."""
    for name, real in names.items():
        text = text.replace("{" + name + "}", real)
    return text


def send(client, names: dict[str, str], case) -> tuple[object, list[str]]:
    """Send one case through an httpx-like `client`; (response, problems)."""
    _, method, path, body, headers, status, param, phrase = case
    headers = {k: fill(v, names) for k, v in {"authorization": "Bearer {key}", **headers}.items()}
    if body is not None and not isinstance(body, bytes):
        body, headers = json.dumps(body).encode(), {**JSON, **headers}
    content = fill(body.decode(), names).encode() if body is not None else None
    r = client.request(method, fill(path, names), headers=headers, content=content)
    problems = []
    if r.status_code != status:
        problems.append(f"status {r.status_code}, expected {status}: {r.text[:300]}")
    if status >= 400 and r.status_code >= 400:
        try:
            error = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            return r, problems + [f"not the error envelope: {r.text[:200]}"]
        if param is not None and error.get("param") != param:
            problems.append(f"param {error.get('param')!r}, expected {param!r} ({error.get('message')})")
        if phrase and phrase not in error.get("message", ""):
            problems.append(f"message does not say {phrase!r}: {error.get('message')}")
        if "/tmp/" in error.get("message", "") or str(names.get("data_dir", "/nonexistent")) in r.text:
            problems.append(f"a server path in the answer: {error.get('message')}")
    return r, problems


def make_objects(client, key: str, train_file) -> dict[str, str]:
    """A file, a queued job and a cancelled one (no workers run here, so jobs stay queued)."""
    auth = {"authorization": f"Bearer {key}"}
    with open(train_file, "rb") as f:
        file_id = client.post("/v1/files", headers=auth, files={"file": ("train.jsonl", f)},
                              data={"purpose": "fine-tune"}).json()["id"]
    names = {"key": key, "file": file_id}
    queued = client.post(JOBS, headers=auth, json=job(training_file=file_id)).json()["id"]
    cancelled = client.post(JOBS, headers=auth, json=job(training_file=file_id)).json()["id"]
    client.post(f"{JOBS}/{cancelled}/cancel", headers=auth)
    return {**names, "queued": queued, "cancelled": cancelled}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_models):
    from fastapi.testclient import TestClient

    from tests.conftest import write_jsonl
    from tuneforge.service.app import create_app
    from tuneforge.service.auth import create_key
    from tuneforge.service.settings import ServiceSettings

    root = tmp_path_factory.mktemp("hostile")
    settings = ServiceSettings(data_dir=root / "data", base_models={"tiny": str(tiny_models["llama"])},
                               max_active_jobs_per_org=50)
    app = create_app(settings)
    key = create_key(app.state.store, app.state.pepper, "acme")
    train = write_jsonl(root / "train.jsonl", CHAT_RECORDS * 2)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, {**make_objects(client, key, train), "data_dir": str(settings.data_dir)}


@pytest.mark.parametrize("case", REQUESTS, ids=[c[0] for c in REQUESTS])
def test_hostile_request(hostile, case):
    client, names = hostile
    _, problems = send(client, names, case)
    assert not problems, "\n".join(problems)


def test_every_listed_model_is_retrievable_and_deletable(tmp_path, tiny_models):
    """Model ids hold ':' and '/' (a base named after its hub id, and its fine-tunes): each one listed can be
    retrieved, and each fine-tune deleted, through the same path the SDK uses."""
    from fastapi.testclient import TestClient

    from tuneforge.service.app import create_app
    from tuneforge.service.auth import create_key
    from tuneforge.service.settings import ServiceSettings
    from tuneforge.service.storage.store import now

    app = create_app(ServiceSettings(data_dir=tmp_path / "data",
                                     base_models={"HuggingFaceTB/tiny": str(tiny_models["llama"])}))
    key = create_key(app.state.store, app.state.pepper, "acme")
    org_id = app.state.store.key_by_prefix(key[6:18])["org_id"]
    fine_tune = "ft:HuggingFaceTB/tiny:acme:my_suffix-1:abcd1234"
    app.state.store.insert_model({"id": fine_tune, "org_id": org_id, "job_id": "ftjob-x", "base": "HuggingFaceTB/tiny",
                                  "created_at": now()})
    auth = {"authorization": f"Bearer {key}"}
    with TestClient(app) as client:
        listed = [m["id"] for m in client.get("/v1/models", headers=auth).json()["data"]]
        assert listed == ["HuggingFaceTB/tiny", fine_tune]
        for model in listed:
            assert client.get(f"/v1/models/{model}", headers=auth).json()["id"] == model
        assert client.delete("/v1/models/HuggingFaceTB/tiny", headers=auth).status_code == 400
        assert client.delete(f"/v1/models/{fine_tune}", headers=auth).json() == {
            "id": fine_tune, "object": "model", "deleted": True}
        assert client.get(f"/v1/models/{fine_tune}", headers=auth).status_code == 404


def test_served_folder_errors_never_show_server_paths(tmp_path, tiny_models):
    """A model that cannot be served is answered with its name and why, not with where it lies on the server."""
    from tuneforge.service.errors import without_server_paths

    text = f"{tmp_path}/jobs/ftjob-1/run: the run has not finished (no adapter/)"
    assert without_server_paths(text) == "<server path>: the run has not finished (no adapter/)"
    assert without_server_paths(text, {f"{tmp_path}/jobs/ftjob-1/run": "ft:x"}) == \
        "ft:x: the run has not finished (no adapter/)"
    assert without_server_paths("see https://example.com/a/b, w/o and 1/2") == "see https://example.com/a/b, w/o and 1/2"
