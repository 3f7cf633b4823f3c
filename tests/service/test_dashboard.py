"""The web dashboard: its pages and assets in-process (headers, content types, no inline code, no key in an
address), the planner endpoint behind its "before you start" panel, and the whole dashboard end to end in
headless Chromium (Debian's `chromium`, driven by Playwright's Python package) against a real
`tuneforge serve`: a key, uploads, the plan, a job whose chart grows while it trains, the models, the
playground, a second org and a wrong key. Screenshots of each page are saved under the test's tmp dir."""
from __future__ import annotations

import json
import re
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import CHAT_RECORDS
from tests.service.conftest import Server, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PAGES = ("/", "/jobs/ftjob-0123456789abcdef01234567", "/models", "/playground")
FIRST_LOAD_LIMIT = 600 * 1024
# A job of the tiny model long enough to watch (a few seconds of steps), short enough for the suite.
TINY_JOB_SPEC = {"training": {"max_steps": 120, "save_every": 40, "precision": "fp32", "max_seq_len": 128}}
BAD_JSONL = '{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": []}\nthis is not JSON\n'


class _Markup(HTMLParser):
    """Every tag of a page with its attributes, and the text inside <script> and <style> elements."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.inline: list[str] = []
        self._open: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._open = tag if tag in ("script", "style") else None

    def handle_data(self, data):
        if self._open and data.strip():
            self.inline.append(f"<{self._open}>{data.strip()[:60]}")

    def handle_endtag(self, tag):
        self._open = None


def _markup(text: str) -> _Markup:
    parsed = _Markup()
    parsed.feed(text)
    return parsed


# ---------------------------------------------------------------- in-process: pages, assets, the plan endpoint


@pytest.fixture(scope="module")
def app(tmp_path_factory, service_model):
    from tuneforge.service.app import create_app
    from tuneforge.service.settings import ServiceSettings

    return create_app(ServiceSettings(data_dir=tmp_path_factory.mktemp("dashboard") / "data",
                                      base_models={"tiny": str(service_model)}))


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        yield client


def _headers(app, org: str) -> dict[str, str]:
    from tuneforge.service.auth import create_key

    keys = app.state.__dict__.setdefault("test_keys", {})
    if org not in keys:
        keys[org] = create_key(app.state.store, app.state.pepper, org)
    return {"Authorization": f"Bearer {keys[org]}"}


def _upload(client, headers, text: str, name: str = "train.jsonl") -> str:
    r = client.post("/v1/files", headers=headers, files={"file": (name, text.encode())}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_pages_send_a_strict_csp_and_hold_no_inline_code(client):
    from tuneforge.service.web.pages import CSP

    assert "script-src 'self'" in CSP and "style-src 'self'" in CSP and "default-src 'none'" in CSP
    assert "unsafe" not in CSP and "connect-src 'self'" in CSP and "frame-ancestors 'none'" in CSP
    for path in PAGES:
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8", path
        assert r.headers["content-security-policy"] == CSP, path
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
        page = _markup(r.text)
        assert page.inline == [], f"{path}: inline code a strict CSP blocks: {page.inline}"
        for tag, attrs in page.tags:
            assert "style" not in attrs and not any(a.startswith("on") for a in attrs), (path, tag, attrs)
            if tag == "script":
                assert attrs["src"].startswith("/assets/"), (path, attrs)
            if tag in ("input", "select", "textarea") and attrs.get("type") != "hidden":
                labelled = any(t == "label" and a.get("for") == attrs.get("id") for t, a in page.tags)
                assert labelled or attrs.get("aria-label"), f"{path}: {tag}#{attrs.get('id')} has no label"
        key_input = next(a for t, a in page.tags if a.get("id") == "key-input")
        # a control without a name is never submitted: even with scripts off the key cannot land in an address
        assert "name" not in key_input and key_input["type"] == "password"
        assert all(t != "form" or "action" not in a for t, a in page.tags)
    job = client.get('/jobs/"><img src=x onerror=alert(1)>')  # the id is shown escaped, whatever it is
    assert job.status_code == 200 and "<img" not in job.text and "&quot;&gt;&lt;img src=x" in job.text


def test_assets_are_served_with_their_content_types(client):
    referenced = set()
    for path in PAGES:
        for tag, attrs in _markup(client.get(path).text).tags:
            url = attrs.get("src") if tag == "script" else attrs.get("href") if tag == "link" else None
            if url and url.startswith("/assets/"):
                referenced.add(url)
    for name in ("api.js", "ui.js", "chart.js"):  # imported by the pages' modules
        referenced.add(f"/assets/{name}")
    assert "/assets/vendor/uplot/uPlot.iife.min.js" in referenced
    kinds = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
    for url in sorted(referenced):
        r = client.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == kinds[url[url.rfind("."):]], url
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["etag"], url
        assert client.get(url, headers={"If-None-Match": r.headers["etag"]}).status_code == 304, url
        if url.endswith(".js") and "vendor" not in url:  # every module the page imports is served too
            for imported in re.findall(r'from "\./([\w.]+)"', r.text):
                assert f"/assets/{imported}" in referenced, (url, imported)
    assert client.get("/assets/vendor/uplot/LICENSE").headers["content-type"] == "text/plain; charset=utf-8"
    for missing in ("/assets/nope.js", "/assets/../router.py", "/assets/%2e%2e/router.py", "/assets/"):
        r = client.get(missing)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", missing


def test_the_key_travels_only_in_the_authorization_header():
    from tuneforge.service.web.pages import assets

    scripts = {name: a.body.decode() for name, a in assets().items() if name.endswith(".js") and "vendor" not in name}
    assert not re.search(r"localStorage\s*[.\[]", "".join(scripts.values()))  # (the comment that says so aside)
    uses = [(name, line.strip()) for name, text in scripts.items() for line in text.splitlines()
            if "session.key()" in line]
    assert sorted(uses) == [("api.js", 'const sent = { ...headers, Authorization: `Bearer ${key || session.key() || ""}` };'),
                    ("ui.js", "if (session.key()) show();")]
    assert not re.search(r"[?&](api_)?key=", "".join(scripts.values()))


def test_plan_refuses_files_it_cannot_see_in_the_error_envelope(app, client):
    acme, other = _headers(app, "acme"), _headers(app, "other")
    theirs = _upload(client, other, "".join(json.dumps(r) + "\n" for r in CHAT_RECORDS * 2))
    body = {"model": "tiny", "training_file": "file-000000000000000000000000"}
    missing = client.post("/v1/tuneforge/plan", headers=acme, json=body)
    foreign = client.post("/v1/tuneforge/plan", headers=acme, json={**body, "training_file": theirs})
    assert missing.status_code == foreign.status_code == 404
    assert missing.json()["error"] == {"message": "No such file: file-000000000000000000000000", "type":
                                       "invalid_request_error", "param": "training_file", "code": "not_found"}
    assert foreign.json()["error"]["message"] == f"No such file: {theirs}"  # the same answer as no file at all
    mine = _upload(client, acme, "".join(json.dumps(r) + "\n" for r in CHAT_RECORDS * 2))
    for bad, status, param in (
            ({"validation_file": theirs}, 404, "validation_file"),
            ({"model": "nope"}, 400, "model"),
            ({"model": 7}, 400, "model"),
            ({"suffix": "a b"}, 400, "suffix"),
            ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}}, 400,
             "method.supervised.hyperparameters.n_epochs"),
            ({"tuneforge": {"method": "nope"}}, 400, None),
            ({"tuneforge": {"output_dir": "/tmp/x"}}, 400, "tuneforge.output_dir"),
            ({"status": "succeeded"}, 400, "status")):
        r = client.post("/v1/tuneforge/plan", headers=acme, json={**body, "training_file": mine, **bad})
        assert r.status_code == status, (bad, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and (param is None or error["param"] == param), (bad, error)
        assert "/tmp" not in error["message"] and str(app.state.ctx.settings.data_dir) not in error["message"]
    assert client.post("/v1/tuneforge/plan", json={**body, "training_file": mine}).status_code == 401
    assert client.post("/v1/tuneforge/plan?wait=-1", headers=acme, json=body).status_code == 400
    r = client.post("/v1/tuneforge/plan", headers={**acme, "Content-Type": "application/json"}, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("The request body is not valid JSON")


def test_plan_reports_the_files_problems_with_their_lines(app, client):
    acme = _headers(app, "acme")
    lines = [json.dumps(r) for r in CHAT_RECORDS * 2]
    lines[2] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    lines[5] = json.dumps({"text": "not a chat"})
    file_id = _upload(client, acme, "\n".join(lines) + "\n")
    r = client.post("/v1/tuneforge/plan", headers=acme, json={"model": "tiny", "training_file": file_id})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["status"] == "done" and answer["verdict"] is None
    assert [p["line"] for p in answer["data_problems"]] == [3, 6]
    assert all(p["param"] == "training_file" and p["file"] == file_id for p in answer["data_problems"])
    assert str(app.state.ctx.settings.data_dir) not in r.text and "<server path>" not in r.text


class _FakePlan:
    """What tuneforge.api.plan answers for one method, in its documented as_dict() form."""

    def as_dict(self) -> dict:
        return {"device": "cpu", "memory_mb": 24000.0, "micro_batch": {"rows": 4, "seq_len": 128}, "total_steps": 8,
                "combinations": [{"method": "lora", "predicted_peak_mb": 600.0, "predicted_step_seconds": 0.02,
                                  "predicted_run_seconds": 0.16, "fits": True, "trainable_params": 32768,
                                  "total_params": 139968, "gradient_checkpointing": False, "note": ""}]}


def test_plan_runs_off_the_event_loop_answers_progress_then_caches(app, client, monkeypatch):
    from tuneforge.service.extensions import plans

    acme = _headers(app, "acme")
    release, planned = threading.Event(), []

    def slow_plan(spec, entry):
        entry.progress = f"probing {spec.method}"
        planned.append(spec.method)
        assert release.wait(30), "the test never released the plan"
        return _FakePlan()

    monkeypatch.setattr(plans, "plan_spec", slow_plan)
    body = {"model": "tiny", "training_file": _upload(client, acme, "".join(json.dumps(r) + "\n" for r in
                                                                            CHAT_RECORDS * 2)),
            "tuneforge": {"method": "dora", "training": {"max_steps": 8}}}
    first = client.post("/v1/tuneforge/plan?wait=0", headers=acme, json=body)
    assert first.status_code == 202 and first.headers["retry-after"] == "1"
    assert first.json()["status"] == "running" and first.json()["method"] == "dora"

    waited = {}

    def wait_for_it():  # holds a request open on the planner while other requests come and go
        started = time.monotonic()
        r = client.post("/v1/tuneforge/plan?wait=20", headers=acme, json=body)
        waited.update(status=r.status_code, seconds=time.monotonic() - started, answer=r.json())

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    started = time.monotonic()
    again = client.post("/v1/tuneforge/plan?wait=0.2", headers=acme, json=body)
    assert again.status_code == 202 and again.json()["progress"] == "probing dora"
    assert client.get("/v1/models", headers=acme).status_code == 200
    assert time.monotonic() - started < 5, "the event loop was blocked by the plan"
    release.set()
    waiter.join(30)
    assert waited["status"] == 200 and waited["seconds"] < 15 and waited["answer"]["cached"] is False
    verdict = waited["answer"]["verdict"]
    assert verdict["fits"] is True and verdict["predicted_peak_mb"] == 600.0
    assert verdict["peak_mb_low"] == 510.0 and verdict["peak_mb_high"] == 690.0 and verdict["fits_at_high"] is True
    assert verdict["uncertainty"] == {"peak_memory": 0.15, "step_time": 0.15}

    cached = client.post("/v1/tuneforge/plan?wait=0", headers=acme, json={**body, "seed": 3, "suffix": "other"})
    assert cached.status_code == 200 and cached.json()["cached"] is True  # same shape: seed and suffix aside
    assert planned == ["dora"], "one plan for one request shape"
    # another org may not reuse it through a file it cannot see
    other = client.post("/v1/tuneforge/plan?wait=0", headers=_headers(app, "other"), json=body)
    assert other.status_code == 404


def test_job_spec_is_its_owners_without_server_paths(app, client):
    acme = _headers(app, "acme")
    file_id = _upload(client, acme, "".join(json.dumps(r) + "\n" for r in CHAT_RECORDS * 2))
    job = client.post("/v1/fine_tuning/jobs", headers=acme, json={
        "model": "tiny", "training_file": file_id, "tuneforge": {"method": "ia3", **TINY_JOB_SPEC}}).json()
    r = client.get(f"/v1/tuneforge/jobs/{job['id']}/spec", headers=acme)
    assert r.status_code == 200, r.text
    spec = r.json()["spec"]
    assert spec["model"] == "tiny" and spec["method"] == "ia3" and spec["data"]["train"] == file_id
    assert spec["training"]["max_steps"] == 120 and "output_dir" not in spec
    assert str(app.state.ctx.settings.data_dir) not in r.text and "<server path>" not in r.text
    assert client.get(f"/v1/tuneforge/jobs/{job['id']}/spec", headers=_headers(app, "other")).status_code == 404
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=acme)


# ---------------------------------------------------------------- end to end in Chromium


@pytest.fixture(scope="module")
def chromium():
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM}): apt-get install -y chromium (.ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed "
                                   "(pip install playwright; it drives /usr/bin/chromium, no browser download)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def web_server(tmp_path_factory, service_model):
    server = Server(tmp_path_factory.mktemp("dashboard-e2e") / "data", service_model, None, workers=1)
    server.start()
    yield server
    server.stop()


class Watch:
    """What a browser context did: every request (address, Authorization header), console problems."""

    def __init__(self, context):
        self.requests: list[tuple[str, str | None]] = []
        self.problems: list[str] = []
        context.on("request", lambda r: self.requests.append((r.url, r.headers.get("authorization"))))
        context.on("console", lambda m: m.type == "error" and "status of 4" not in m.text
                   and self.problems.append(m.text))
        context.on("weberror", lambda e: self.problems.append(str(e.error)))


def _new_tab(browser, width: int = 1280):
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    context = browser.new_context(viewport={"width": width, "height": 900}, accept_downloads=True)
    context.set_default_timeout(30_000)
    return context, Watch(context), context.new_page()


def _sign_in(page, base: str, key: str) -> None:
    from playwright.sync_api import expect

    page.goto(base + "/")
    expect(page.locator("#key-input")).to_be_focused()  # the key panel takes the keyboard at once
    page.keyboard.type(key)
    page.keyboard.press("Enter")
    expect(page.locator("#main")).to_be_visible()


def _shot(page, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def test_dashboard_end_to_end(chromium, web_server, tmp_path, train_jsonl):
    from playwright.sync_api import expect

    base = web_server.url.removesuffix("/v1")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    acme, other = web_server.key("acme"), web_server.key("other")
    context, watch, page = _new_tab(chromium)

    # A wrong key is refused and not kept.
    page.goto(base + "/")
    expect(page.locator("#key-panel")).to_be_visible()
    expect(page.locator("#main")).to_be_hidden()
    page.fill("#key-input", "sk-tf-" + "x" * 40)
    page.click("#key-form button")
    expect(page.locator("#key-error")).to_contain_text("This key was refused")
    expect(page.locator("#main")).to_be_hidden()
    assert page.evaluate("() => sessionStorage.length") == 0

    _sign_in(page, base, acme)
    assert page.evaluate("() => [sessionStorage.length, localStorage.length]") == [1, 0]

    expect(page.locator("#before-after")).to_be_disabled()  # a before/after report needs a validation file
    # The job's settings first (a short run of the tiny model), so that the upload asks for one plan only.
    page.click("#job-form details summary")
    page.fill("#spec-extra", json.dumps(TINY_JOB_SPEC))
    page.fill("#suffix", "e2e")

    # Uploads: a bad file's problem names its line; a good one becomes the training file.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(BAD_JSONL)
    page.set_input_files("#upload-input", str(bad))
    expect(page.locator("#upload-error")).to_contain_text("line 3: invalid JSON")
    page.set_input_files("#upload-input", str(train_jsonl))
    expect(page.locator("#upload-status")).to_contain_text("Uploaded train.jsonl as file-")
    expect(page.locator("#training-file")).to_have_value(re.compile(r"^file-"))

    # Before you start: the planner's verdict on the job the form would make (a plan of an unseen shape
    # probes in a child process: the panel shows its progress meanwhile).
    expect(page.locator("#plan-verdict")).to_be_visible(timeout=120_000)
    expect(page.locator("#plan-status")).to_contain_text("Fits: lora needs about")
    expect(page.locator("#plan-verdict")).to_contain_text("± 15 %")
    expect(page.locator("#plan-verdict")).to_contain_text("for 120 steps")
    _shot(page, shots, "jobs")

    # Start it and watch the chart gain points while it trains.
    page.click("#job-submit")
    page.wait_for_url(re.compile(r"/jobs/ftjob-[0-9a-f]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    samples, deadline = [], time.time() + 150
    while time.time() < deadline:
        status = page.locator("#job-summary .badge").text_content() or ""
        samples.append((status, int(page.get_attribute("#chart", "data-points") or 0)))
        if status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.25)
    assert samples[-1][0] == "succeeded", samples[-5:]
    while_running = sorted({points for status, points in samples if status == "running" and points > 0})
    assert len(while_running) >= 2, f"the chart did not grow while the job ran: {samples}"
    expect(page.locator("#chart")).to_have_attribute("data-points", "120")
    expect(page.locator("#chart canvas")).to_be_visible()
    expect(page.locator("#checkpoints-table tbody tr")).to_have_count(2)  # the run keeps its newest two
    expect(page.locator("#job-spec")).to_contain_text('"max_steps": 120')
    with page.expect_download() as download:
        page.click("#result-files button >> nth=0")
    assert Path(download.value.path()).read_text().startswith("step")
    expect(page.locator("#report-hint")).to_contain_text("tuneforge.eval.before_after")  # this job has no report
    _shot(page, shots, "job")

    # The job page's first load, everything it fetches included, nothing from the cache.
    cdp = context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.setCacheDisabled", {"cacheDisabled": True})
    loaded: list = []
    page.on("requestfinished", lambda r: loaded.append(r))
    page.reload(wait_until="networkidle")
    expect(page.locator("#chart")).to_have_attribute("data-points", "120")
    loaded = [r for r in loaded if r.url.startswith("http")]
    first_load = sum(r.sizes()["responseBodySize"] + r.sizes()["responseHeadersSize"] for r in loaded)
    print(f"job page first load: {first_load} bytes in {len(loaded)} requests")
    assert 50_000 < first_load <= FIRST_LOAD_LIMIT
    cdp.send("Network.setCacheDisabled", {"cacheDisabled": False})

    # Models: the fine-tuned model and its checkpoints.
    page.click("nav >> text=Models")
    expect(page.locator("#tuned-table tbody tr")).to_have_count(1)
    fine_tuned = page.locator("#tuned-table tbody tr").get_attribute("data-model")
    assert re.fullmatch(r"ft:tiny:acme:e2e:[0-9a-f]{8}", fine_tuned)
    expect(page.locator("#ckpt-table tbody tr")).to_have_count(2)
    _shot(page, shots, "models")

    # Playground: the fine-tuned model beside its base, both streamed.
    page.click(f'#tuned-table a[href="/playground?model={fine_tuned.replace(":", "%3A")}"]')
    expect(page.locator("#pg-model")).to_have_value(fine_tuned)
    expect(page.locator("#pg-compare")).to_have_value("tiny")
    page.fill("#pg-temperature", "0")  # greedy: the same answer every run
    page.fill("#pg-max-tokens", "8")
    page.fill("#pg-message", "Say hi")
    page.keyboard.press("Control+Enter")
    for pane in ("a", "b"):
        expect(page.locator(f"#pane-{pane}-status")).to_have_attribute("data-done", "true")
        expect(page.locator(f"#pane-{pane}-status")).to_contain_text(re.compile(r"[1-8] tokens in"))
        assert page.locator(f"#pane-{pane} li.assistant").text_content(), pane
    _shot(page, shots, "playground")

    # Narrow screens: no page scrolls sideways; the keyboard reaches the skip link first.
    page.set_viewport_size({"width": 390, "height": 800})
    for path in ("/", "/models", "/playground", f"/jobs/{job_id}"):
        page.goto(base + path)
        expect(page.locator("#main")).to_be_visible()
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth"), path
        page.keyboard.press("Tab")
        assert page.evaluate("() => document.activeElement.textContent") == "Skip to content", path
    _shot(page, shots, "job-narrow")

    # A second org's key sees none of it.
    context2, watch2, page2 = _new_tab(chromium)
    _sign_in(page2, base, other)
    expect(page2.locator("#jobs-empty")).to_contain_text("No jobs yet")
    page2.goto(f"{base}/jobs/{job_id}")
    expect(page2.locator("#job-summary")).to_contain_text(f"No such job in your organization: {job_id}")
    expect(page2.locator("#chart")).to_have_attribute("data-points", "0")
    _shot(page2, shots, "other-org-job")
    page2.goto(base + "/models")
    expect(page2.locator("#models-status")).to_contain_text("0 fine-tuned, 0 checkpoint")
    page2.goto(base + "/playground")
    expect(page2.locator("#pg-model")).to_have_value("tiny")
    assert fine_tuned not in page2.locator("#pg-model").inner_text()

    # A job with a validation file and tuneforge.eval.before_after: its page shows the before/after report.
    client = web_server.client("acme")
    with open(train_jsonl, "rb") as f:
        file_id = client.files.create(file=f, purpose="fine-tune").id
    report_job = client.fine_tuning.jobs.create(model="tiny", training_file=file_id, validation_file=file_id,
                                                extra_body={"tuneforge": {
                                                    "training": {**TINY_JOB_SPEC["training"], "max_steps": 2},
                                                    "eval": {"max_new_tokens": 4, "examples": 2}}})
    assert wait_for(client, report_job.id, ("succeeded", "failed")).status == "succeeded"
    page.goto(f"{base}/jobs/{report_job.id}")
    expect(page.locator("#report")).to_be_visible()
    expect(page.locator("#report-table tbody")).to_contain_text("token_accuracy")
    expect(page.locator("#report-examples-table tbody tr")).to_have_count(2)
    expect(page.locator("#report-hint")).to_be_hidden()
    assert str(web_server.data_dir) not in page.locator("#report").inner_text()
    _shot(page, shots, "job-report")

    # The keys travelled in the Authorization header only, and nothing broke the CSP.
    for url, _ in watch.requests + watch2.requests:
        assert acme not in url and other not in url, url
    api_calls = [(u, auth) for u, auth in watch.requests if "/v1/" in u]
    assert api_calls and all(auth in (f"Bearer {acme}", "Bearer sk-tf-" + "x" * 40) for _, auth in api_calls)
    assert watch.problems == [] and watch2.problems == [], watch.problems + watch2.problems
    context.close()
    context2.close()
