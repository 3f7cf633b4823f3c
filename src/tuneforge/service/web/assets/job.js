// Job page: the job, its live training curves, events, checkpoints, result files and controls. While the job is
// unfinished it polls the events endpoint: the newest page, read back until an event already seen (the API
// lists events newest first, and `after` pages towards older ones).
import { api, listAll, paths, request } from "./api.js";
import { MetricsChart } from "./chart.js";
import { $, badge, boot, downloadFile, el, fmt, FINISHED, playgroundLink, say, setChildren } from "./ui.js";

const POLL_MS = 1000;
const PAUSED_POLL_MS = 3000;
const FIRST_EVENTS_PAGE = 500;  // the first load reads back the whole history in pages this big
const NEW_EVENTS_PAGE = 50;  // a poll usually finds a few new events: it reads more only if all were new
const EVENTS_SHOWN = 300;

const jobId = $("#job-id").dataset.jobId;
let job = null;
let events = [];  // newest first
const seenEvents = new Set();
let chart = null;
let lastCheckpointEvents = -1;
let tuneforgeMethod = null;  // from the resolved spec

async function newEvents() {
  const fresh = [];
  let after = null;
  for (;;) {
    const limit = seenEvents.size ? NEW_EVENTS_PAGE : FIRST_EVENTS_PAGE;
    const page = await api.get(`${paths.job(jobId)}/events?limit=${limit}`
      + (after ? `&after=${encodeURIComponent(after)}` : ""));
    let reachedSeen = false;
    for (const event of page.data) {
      if (seenEvents.has(event.id)) {
        reachedSeen = true;
        break;
      }
      fresh.push(event);
    }
    if (reachedSeen || !page.has_more || !page.data.length) break;
    after = page.data[page.data.length - 1].id;
  }
  for (const event of fresh) seenEvents.add(event.id);
  events = fresh.concat(events);
  return fresh;
}

let shownSummary = "";

function renderJob() {
  const progress = job.status === "running" && job.estimated_finish
    ? ` · estimated finish ${fmt.time(job.estimated_finish)}` : "";
  const summary = [job.status, job.fine_tuned_model, progress].join("|");
  if (summary !== shownSummary) {  // a live region: changed only when its text does, so it is read once
    shownSummary = summary;
    setChildren($("#job-summary"), badge(job.status), ` ${job.model}`,
      job.fine_tuned_model ? [" → ", el("span", { class: "mono", text: job.fine_tuned_model }), " ",
        playgroundLink(job.fine_tuned_model, "Try it")] : "", progress);
  }
  const error = $("#job-error");
  error.hidden = !job.error;
  error.textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
  $("#job-pause").disabled = !["validating_files", "queued", "running"].includes(job.status);
  $("#job-resume").disabled = job.status !== "paused";
  $("#job-cancel").disabled = FINISHED.has(job.status);
  const hp = job.hyperparameters || {};
  const facts = [
    ["Status", STATUS(job)], ["Base model", job.model],
    ["Method", `${job.method ? job.method.type : "supervised"}${tuneforgeMethod ? `, ${tuneforgeMethod}` : ""}`],
    ["Epochs", hp.n_epochs], ["Batch size", hp.batch_size], ["Learning rate multiplier", hp.learning_rate_multiplier],
    ["Seed", job.seed], ["Training file", job.training_file], ["Validation file", job.validation_file || "—"],
    ["Created", fmt.date(job.created_at)], ["Finished", fmt.date(job.finished_at)],
    ["Trained tokens", fmt.count(job.trained_tokens)], ["Fine-tuned model", job.fine_tuned_model || "—"],
  ];
  if (job.metadata && Object.keys(job.metadata).length) facts.push(["Metadata", JSON.stringify(job.metadata)]);
  setChildren($("#job-details"), facts.map(([term, value]) => [el("dt", { text: term }),
    el("dd", { text: value === undefined || value === null ? "—" : String(value) })]));
}

const STATUS = (j) => j.status.replace("_", " ");

function renderChart(fresh) {
  const points = fresh.filter((e) => e.type === "metrics" && e.data).map((e) => e.data);
  if (!points.length) return;
  chart.add(points);
  const newest = events.find((e) => e.type === "metrics" && e.data);
  const d = newest.data;
  const parts = [`Step ${d.step}${d.total_steps ? ` of ${d.total_steps}` : ""}`,
    `training loss ${fmt.number(d.train_loss)}`];
  if (d.valid_loss !== null && d.valid_loss !== undefined) parts.push(`validation loss ${fmt.number(d.valid_loss)}`);
  if (d.train_mean_token_accuracy !== null && d.train_mean_token_accuracy !== undefined) {
    parts.push(`token accuracy ${fmt.percent(d.train_mean_token_accuracy)}`);
  }
  $("#chart-latest").textContent = `${parts.join(", ")} (${$("#chart").dataset.points} steps drawn).`;
}

function renderEvents() {
  const withMetrics = $("#events-metrics").checked;
  const shown = events.filter((e) => withMetrics || e.type !== "metrics").slice(0, EVENTS_SHOWN);
  setChildren($("#events"), shown.map((e) => el("li", { class: e.level === "info" ? "" : e.level },
    el("time", { datetime: fmt.iso(e.created_at), text: fmt.time(e.created_at) }),
    el("span", { text: e.message }))));
}

async function renderCheckpoints() {
  const checkpoints = await listAll(`${paths.job(jobId)}/checkpoints`, { limit: 100 });
  setChildren($("#checkpoints-table tbody"), checkpoints.map((c) => el("tr", {},
    el("td", { class: "num", text: c.step_number }),
    el("td", { class: "mono", text: c.fine_tuned_model_checkpoint }),
    el("td", { class: "num", text: fmt.number(c.metrics.train_loss) }),
    el("td", { class: "num", text: fmt.number(c.metrics.valid_loss) }),
    el("td", { class: "num", text: c.metrics.train_mean_token_accuracy == null ? "—"
      : fmt.percent(c.metrics.train_mean_token_accuracy) }),
    el("td", { class: "num", text: c.metrics.valid_mean_token_accuracy == null ? "—"
      : fmt.percent(c.metrics.valid_mean_token_accuracy) }),
    el("td", { text: fmt.date(c.created_at) }),
    el("td", {}, playgroundLink(c.fine_tuned_model_checkpoint)))));
  $("#checkpoints-empty").hidden = checkpoints.length > 0;
}

async function renderResults() {
  if (!job.result_files.length) return;
  const files = await Promise.all(job.result_files.map((id) => api.get(paths.file(id)).catch(() => ({ id }))));
  setChildren($("#result-files"), files.map((f) => el("li", {},
    el("button", { type: "button", class: "secondary", text: `Download ${f.filename || f.id}`,
                   onclick: (e) => downloadFile(f.id, f.filename).catch((err) => { e.target.textContent = err.message; }) }),
    f.bytes !== undefined ? ` ${fmt.bytes(f.bytes)}` : "")));
  await renderReport(files).catch((e) => { $("#report-hint").textContent = `The report could not be read: ${e.message}`; });
}

// The before/after report's metrics in evaluation/report.py's order: lower is better, then higher is better.
const LOWER_IS_BETTER = ["loss", "perplexity"];
const HIGHER_IS_BETTER = ["accuracy", "macro_f1", "token_accuracy", "exact_match", "f1", "token_f1", "bleu", "chrf",
  "rule_pass_rate", "distinct_1", "distinct_2", "entity_precision", "entity_recall", "entity_f1", "reward_accuracy",
  "reward_margin", "implicit_reward_accuracy"];
const REPORT_EXAMPLES = 5;  // when the resolved spec does not say (eval.examples)

/** The job's report.json (a result file, read through the Files API) as a table and examples side by side. */
async function renderReport(files) {
  const file = files.find((f) => f.filename === "report.json");
  if (!file) return;
  const report = await (await request(`${paths.file(file.id)}/content`)).json();
  const base = report.base || {}, tuned = report.fine_tuned || {};
  const rows = [...LOWER_IS_BETTER, ...HIGHER_IS_BETTER]
    .filter((k) => typeof base[k] === "number" && typeof tuned[k] === "number")
    .map((k) => {
      const change = tuned[k] - base[k];
      const better = LOWER_IS_BETTER.includes(k) ? change < 0 : change > 0;
      return el("tr", {},
        el("th", { scope: "row", text: k }),
        el("td", { class: "num", text: fmt.number(base[k]) }),
        el("td", { class: "num", text: fmt.number(tuned[k]) }),
        el("td", { class: "num", text: `${change >= 0 ? "+" : ""}${fmt.number(change)}`
          + (change === 0 ? "" : better ? " (better)" : " (worse)") }));
    });
  setChildren($("#report-table tbody"), rows);
  say($("#report-summary"), `${fmt.count(base.examples)} held-out examples from ${report.data || "the validation file"}; `
    + "the same data and greedy decoding for both models.");
  let shown = REPORT_EXAMPLES;
  try {
    const spec = (await api.get(paths.jobSpec(jobId))).spec;
    if (spec.eval && Number.isInteger(spec.eval.examples)) shown = spec.eval.examples;
  } catch { /* the default */ }
  const before = base.outputs || [], after = tuned.outputs || [];
  const examples = before.slice(0, Math.min(shown, after.length)).map((b, i) => el("tr", {},
    el("td", { text: b.prompt }), el("td", { text: b.reference }), el("td", { text: b.output }),
    el("td", { text: after[i].output })));
  setChildren($("#report-examples-table tbody"), examples);
  $("#report-examples").hidden = examples.length === 0;
  $("#report").hidden = false;
  $("#report-hint").hidden = true;
}

async function renderSpec() {
  try {
    const answer = await api.get(paths.jobSpec(jobId));
    $("#job-spec").textContent = JSON.stringify(answer.spec, null, 2);
    tuneforgeMethod = answer.spec.method || null;
    renderJob();
  } catch (e) {
    $("#job-spec").textContent = `Not available: ${e.message}`;
  }
}

async function refresh() {
  const before = job ? job.status : null;
  job = await api.get(paths.job(jobId));
  const fresh = await newEvents();
  renderJob();
  renderChart(fresh);
  if (fresh.length) renderEvents();
  const checkpointEvents = events.filter((e) => e.message.startsWith("Checkpoint created")).length;
  if (checkpointEvents !== lastCheckpointEvents || job.status !== before) {
    lastCheckpointEvents = checkpointEvents;
    await renderCheckpoints();
  }
  if (job.status !== before && job.status === "succeeded") await renderResults();
  if (job.status !== before) renderSpec();
}

async function poll() {
  try {
    await refresh();
  } catch (e) {
    if (e.status === 404) {
      say($("#job-summary"), `No such job in your organization: ${jobId}`);
      return;  // not ours, or gone: nothing to poll
    }
    $("#job-error").hidden = false;
    $("#job-error").textContent = `Could not refresh: ${e.message}; trying again.`;
  }
  if (job && FINISHED.has(job.status)) return;
  setTimeout(poll, job && job.status === "paused" ? PAUSED_POLL_MS : POLL_MS);
}

async function control(what) {
  if (what === "cancel" && !window.confirm(`Cancel job ${jobId}? It stops at its next step; this cannot be undone.`)) {
    return;
  }
  try {
    job = await api.post(`${paths.job(jobId)}/${what}`);
    renderJob();
  } catch (e) {
    $("#job-error").hidden = false;
    $("#job-error").textContent = e.message;
  }
}

boot(() => {
  chart = new MetricsChart($("#chart"));
  $("#events-metrics").addEventListener("change", renderEvents);
  for (const what of ["pause", "resume", "cancel"]) $(`#job-${what}`).addEventListener("click", () => control(what));
  poll();
});
