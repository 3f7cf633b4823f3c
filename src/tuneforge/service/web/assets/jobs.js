// Jobs page: the org's fine-tuning jobs (filtered by status) and the new-job form, whose "before you start"
// panel shows the planner's verdict on the very request the form would send.
import { api, ApiError, listAll, request } from "./api.js";
import { $, badge, boot, el, fmt, FINISHED, say, setChildren } from "./ui.js";

// A plan still running is asked for again: each ask re-checks the request (its files included), so it waits
// on the server a little (the answer comes the moment the plan is done) rather than asking often.
const PLAN_WAIT_SECONDS = 2;
const PLAN_POLL_MS = 300;
const PLAN_DEBOUNCE_MS = 500;
const JOBS_REFRESH_MS = 5000;

let jobs = [];
let jobsHasMore = false;

// ---------------------------------------------------------------- the jobs list

async function loadJobs({ older = false } = {}) {
  const after = older && jobs.length ? `&after=${encodeURIComponent(jobs[jobs.length - 1].id)}` : "";
  const page = await api.get(`/v1/fine_tuning/jobs?limit=100${after}`);
  jobs = older ? jobs.concat(page.data) : mergeNewest(page.data);
  jobsHasMore = older ? page.has_more : jobsHasMore || page.has_more;
  renderJobs();
}

function mergeNewest(fresh) {
  // a refresh re-reads the newest page; older pages already loaded are kept
  const ids = new Set(fresh.map((j) => j.id));
  return fresh.concat(jobs.filter((j) => !ids.has(j.id)));
}

function renderJobs() {
  const wanted = $("#status-filter").value;
  const shown = jobs.filter((j) => !wanted || (wanted === "active" ? !FINISHED.has(j.status) : j.status === wanted));
  setChildren($("#jobs-table tbody"), shown.map((job) => el("tr", { "data-job-id": job.id, "data-status": job.status },
    el("td", {}, el("a", { href: `/jobs/${encodeURIComponent(job.id)}`, class: "mono", text: job.id })),
    el("td", {}, badge(job.status)),
    el("td", { class: "mono", text: job.model }),
    el("td", { text: job.method ? job.method.type : "supervised" }),
    el("td", {}, el("time", { datetime: fmt.iso(job.created_at), text: fmt.date(job.created_at) })),
    el("td", {}, job.finished_at ? el("time", { datetime: fmt.iso(job.finished_at), text: fmt.date(job.finished_at) })
      : "—"),
    el("td", { class: "num", text: fmt.count(job.trained_tokens) }),
    el("td", { class: "mono", text: job.fine_tuned_model || "—" }))));
  $("#jobs-empty").hidden = shown.length > 0;
  $("#jobs-empty").textContent = jobs.length ? "No jobs with this status." : "No jobs yet: start one above.";
  $("#jobs-more").hidden = !jobsHasMore;
}

function keepJobsFresh() {
  setInterval(() => {
    if (!document.hidden && jobs.some((j) => !FINISHED.has(j.status))) loadJobs().catch(() => {});
  }, JOBS_REFRESH_MS);
}

// ---------------------------------------------------------------- files

async function loadFiles(select) {
  const files = await listAll("/v1/files?purpose=fine-tune", { limit: 1000, max: 1000 });
  for (const id of ["#training-file", "#validation-file"]) {
    const box = $(id);
    const keep = select && id === "#training-file" ? select : box.value;
    const first = box.options[0];
    setChildren(box, first, files.map((f) => el("option", { value: f.id,
      text: `${f.filename} · ${fmt.bytes(f.bytes)} · ${f.id}` })));
    box.value = files.some((f) => f.id === keep) ? keep : "";
  }
  syncBeforeAfter();
}

/** The before/after report evaluates the validation file: the box is only on offer with one chosen. */
function syncBeforeAfter() {
  const box = $("#before-after");
  box.disabled = !$("#validation-file").value;
  if (box.disabled) box.checked = false;
}

async function upload(file) {
  const status = $("#upload-status"), error = $("#upload-error");
  error.textContent = "";
  say(status, `Uploading ${file.name} (${fmt.bytes(file.size)})…`, { busy: true });
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file, file.name);
  try {
    const uploaded = await (await request("/v1/files", { method: "POST", form })).json();
    say(status, `Uploaded ${uploaded.filename} as ${uploaded.id}: chosen as the training file.`);
    await loadFiles(uploaded.id);
    planSoon();
  } catch (e) {
    say(status, "");
    error.textContent = `${file.name} was not accepted: ${e.message}`;
  } finally {
    $("#upload-input").value = "";
  }
}

// ---------------------------------------------------------------- the request the form makes

/** The job request of the form, or throws Error naming the field at fault. */
function jobRequest() {
  const body = { model: $("#base-model").value, training_file: $("#training-file").value };
  if (!body.model) throw fieldError("#base-model", "Choose a base model.");
  if (!body.training_file) throw fieldError("#training-file", "Upload or choose a training file.");
  if ($("#validation-file").value) body.validation_file = $("#validation-file").value;
  const hyperparameters = {};
  for (const [id, name, whole] of [["#n-epochs", "n_epochs", true], ["#batch-size", "batch_size", true],
                                   ["#lr-multiplier", "learning_rate_multiplier", false]]) {
    const input = $(id);
    const text = input.value.trim();
    if (!text) {
      if (input.validity.badInput) throw fieldError(id, `${labelOf(input)}: enter a number, or leave it empty for auto.`);
      continue;
    }
    const value = Number(text);
    if (!Number.isFinite(value) || (whole && !Number.isInteger(value))) {
      throw fieldError(id, `${labelOf(input)}: enter ${whole ? "a whole number" : "a number"}, or leave it empty for auto.`);
    }
    hyperparameters[name] = value;
  }
  body.method = { type: "supervised", supervised: { hyperparameters } };
  const suffix = $("#suffix").value.trim();
  if (suffix) body.suffix = suffix;
  let extra = {};
  const extraText = $("#spec-extra").value.trim();
  if (extraText) {
    try {
      extra = JSON.parse(extraText);
    } catch (e) {
      throw fieldError("#spec-extra", `Spec fields: not valid JSON (${e.message}).`);
    }
    if (typeof extra !== "object" || extra === null || Array.isArray(extra)) {
      throw fieldError("#spec-extra", "Spec fields: give a JSON object, e.g. {\"training\": {\"max_steps\": 20}}.");
    }
  }
  body.tuneforge = { ...extra, method: $("#method").value };
  if (body.validation_file && $("#before-after").checked) {
    body.tuneforge.eval = { ...(extra.eval || {}), before_after: true };
  }
  return body;
}

function labelOf(input) {
  return input.labels && input.labels[0] ? input.labels[0].textContent : input.id;
}

function fieldError(selector, message) {
  const error = new Error(message);
  error.field = selector;
  return error;
}

// ---------------------------------------------------------------- before you start: the plan

let planRun = 0;
let planTimer = null;

function planSoon() {
  clearTimeout(planTimer);
  planTimer = setTimeout(plan, PLAN_DEBOUNCE_MS);
}

async function plan() {
  const run = ++planRun;  // a newer plan (the form changed) makes this one stop updating the panel
  const status = $("#plan-status"), panel = $("#plan");
  panel.classList.remove("fits", "close", "nofit");
  $("#plan-verdict").hidden = true;
  setChildren($("#plan-problems"));
  let body;
  try {
    body = jobRequest();
  } catch (e) {
    say(status, e.field === "#training-file" || e.field === "#base-model"
      ? "Choose a training file and a base model to see whether the job fits this server and how long it takes."
      : e.message);
    return;
  }
  say(status, `Planning ${body.tuneforge.method}…`, { busy: true });
  for (;;) {
    let answer;
    try {
      answer = await api.post(`/v1/tuneforge/plan?wait=${PLAN_WAIT_SECONDS}`, body);
    } catch (e) {
      if (run === planRun) say(status, `No plan: ${e.message}`);
      return;
    }
    if (run !== planRun) return;
    renderProblems(answer.data_problems);
    if (answer.status === "done") {
      renderVerdict(answer);
      return;
    }
    say(status, `Planning ${answer.method} (${Math.round(answer.elapsed_seconds)} s): ${answer.progress}. `
      + "You can go on filling the form.", { busy: true });
    await new Promise((resolve) => setTimeout(resolve, PLAN_POLL_MS));
    if (run !== planRun) return;
  }
}

function renderProblems(problems) {
  setChildren($("#plan-problems"), (problems || []).map((p) => el("li", {
    text: `${p.param} ${p.file}${p.line ? ` line ${p.line}` : ""}: ${p.field}: ${p.message}` })));
}

function renderVerdict(answer) {
  const status = $("#plan-status"), panel = $("#plan"), facts = $("#plan-verdict");
  const v = answer.verdict;
  if (!v) {
    panel.classList.add("nofit");
    say(status, "The files have problems (below): a job on them would fail. Fix them and upload again.");
    return;
  }
  const u = v.uncertainty;
  let headline;
  if (v.fits === null) headline = `No prediction for ${answer.method}: ${v.note}`;
  else if (!v.fits) headline = `Does not fit: ${answer.method} would need about ${fmt.megabytes(v.predicted_peak_mb)} `
    + `of the ${fmt.megabytes(v.memory_mb)} this server has.`;
  else if (!v.fits_at_high) headline = `Fits, close to the limit: ${answer.method} needs about `
    + `${fmt.megabytes(v.predicted_peak_mb)} of ${fmt.megabytes(v.memory_mb)}.`;
  else headline = `Fits: ${answer.method} needs about ${fmt.megabytes(v.predicted_peak_mb)} of ${fmt.megabytes(v.memory_mb)}.`;
  panel.classList.add(v.fits === false ? "nofit" : v.fits_at_high === false ? "close" : v.fits ? "fits" : "close");
  say(status, headline + (answer.cached ? " (cached)" : ` (planned in ${fmt.seconds(answer.elapsed_seconds)})`));
  const rows = [
    ["Predicted peak memory", v.predicted_peak_mb === null ? "—" : `${fmt.megabytes(v.predicted_peak_mb)} `
      + `± ${fmt.percent(u.peak_memory)} (${fmt.megabytes(v.peak_mb_low)} – ${fmt.megabytes(v.peak_mb_high)})`],
    ["Step time", v.predicted_step_seconds === null ? "—"
      : `${fmt.seconds(v.predicted_step_seconds)} ± ${fmt.percent(u.step_time)}`],
    ["Run time", v.predicted_run_seconds === null ? "—"
      : `${fmt.seconds(v.predicted_run_seconds)} ± ${fmt.percent(u.step_time)} for ${fmt.count(v.total_steps)} steps`],
    ["Micro-batch", `${v.micro_batch.rows} × ${v.micro_batch.seq_len} tokens`
      + (v.gradient_checkpointing ? ", gradient checkpointing" : "")],
    ["Trainable parameters", `${fmt.count(v.trainable_params)} of ${fmt.count(v.total_params)}`],
    ["Machine", `${v.device}, ${fmt.megabytes(v.memory_mb)}`],
  ];
  if (v.note) rows.push(["Note", v.note]);
  setChildren(facts, rows.map(([term, value]) => [el("dt", { text: term }), el("dd", { text: value })]));
  facts.hidden = false;
}

// ---------------------------------------------------------------- submit

async function submit(event) {
  event.preventDefault();
  const error = $("#job-form-error"), button = $("#job-submit");
  error.textContent = "";
  let body;
  try {
    body = jobRequest();
  } catch (e) {
    error.textContent = e.message;
    if (e.field) $(e.field).focus();
    return;
  }
  button.disabled = true;
  try {
    // one key per click: a retry of this request by the browser never makes a second job
    const job = await (await request("/v1/fine_tuning/jobs", { method: "POST", json: body,
      headers: { "Idempotency-Key": crypto.randomUUID() } })).json();
    if (job.status === "failed") {
      error.replaceChildren(`The job failed its checks: ${job.error ? job.error.message : "see its events"} `,
        el("a", { href: `/jobs/${encodeURIComponent(job.id)}`, text: `(job ${job.id})` }));
      loadJobs().catch(() => {});
      return;
    }
    window.location.assign(`/jobs/${encodeURIComponent(job.id)}`);
  } catch (e) {
    error.textContent = e instanceof ApiError && e.param ? `${e.message}` : `Not started: ${e.message}`;
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- start

async function start() {
  $("#upload-input").addEventListener("change", (e) => { if (e.target.files[0]) upload(e.target.files[0]); });
  $("#job-form").addEventListener("submit", submit);
  $("#validation-file").addEventListener("change", syncBeforeAfter);
  $("#job-form").addEventListener("change", (e) => { if (e.target.id !== "upload-input") planSoon(); });
  $("#status-filter").addEventListener("change", renderJobs);
  $("#jobs-refresh").addEventListener("click", () => loadJobs().catch(showListError));
  $("#jobs-more").addEventListener("click", () => loadJobs({ older: true }).catch(showListError));
  const [models] = await Promise.all([api.get("/v1/models"), loadFiles(), loadJobs().catch(showListError)]);
  const bases = models.data.filter((m) => m.owned_by === "tuneforge");
  setChildren($("#base-model"), bases.map((m) => el("option", { value: m.id, text: m.id })));
  keepJobsFresh();
}

function showListError(e) {
  $("#jobs-empty").hidden = false;
  $("#jobs-empty").textContent = `Could not list the jobs: ${e.message}`;
}

boot(() => start().catch((e) => { $("#job-form-error").textContent = e.message; }));
