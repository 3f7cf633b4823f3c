// Playground: one conversation sent to a model and, side by side, to another (its base by default), each
// answer streamed from /v1/chat/completions as it is generated.
import { listAll, api, paths, readStream, request } from "./api.js";
import { $, boot, el, say, setChildren } from "./ui.js";

const CHECKPOINT_JOBS = 20;

class Pane {
  constructor(id) {
    this.list = $(`#${id}`);
    this.title = $(`#${id}-title`);
    this.status = $(`#${id}-status`);
    this.messages = [];
    this.model = null;
  }

  use(model) {
    if (model !== this.model) this.clear();
    this.model = model;
    this.title.textContent = model || "—";
  }

  clear() {
    this.messages = [];
    setChildren(this.list);
    this.status.textContent = "";
  }

  /** Send the conversation with `text` added; the answer streams into a new bubble. */
  async send(text, { system, temperature, maxTokens, signal }) {
    this.messages.push({ role: "user", content: text });
    this.list.append(el("li", { class: "user", text }));
    const bubble = el("li", { class: "assistant", "data-model": this.model });
    this.list.append(bubble);
    const started = performance.now();
    say(this.status, "Generating…", { busy: true });
    const messages = system ? [{ role: "system", content: system }, ...this.messages] : [...this.messages];
    let answer = "", usage = null, finish = null, chunks = 0;
    try {
      const response = await request("/v1/chat/completions", { method: "POST", signal, json: {
        model: this.model, messages, temperature, max_tokens: maxTokens, stream: true,
        stream_options: { include_usage: true } } });
      await readStream(response, (chunk) => {
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            answer += choice.delta.content;
            bubble.textContent = answer;
            chunks += 1;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      });
      this.messages.push({ role: "assistant", content: answer });
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      say(this.status, `${usage ? usage.completion_tokens : chunks} tokens in ${seconds} s, finish: ${finish || "—"}`);
      this.status.dataset.done = "true";
    } catch (e) {
      this.messages.pop();
      bubble.textContent = answer;
      say(this.status, e.name === "AbortError" ? "Stopped." : `Error: ${e.message}`);
      this.status.dataset.done = "error";
    }
  }
}

const panes = { a: new Pane("pane-a"), b: new Pane("pane-b") };
let baseOf = new Map();  // fine-tuned or checkpoint model -> its base
let running = null;

async function loadModels() {
  const [models, jobs] = await Promise.all([api.get("/v1/models"), listAll("/v1/fine_tuning/jobs", { max: 500 })]);
  baseOf = new Map(jobs.filter((j) => j.fine_tuned_model).map((j) => [j.fine_tuned_model, j.model]));
  const lists = await Promise.all(jobs.slice(0, CHECKPOINT_JOBS).map((j) =>
    listAll(`${paths.job(j.id)}/checkpoints`, { limit: 100 }).catch(() => [])
      .then((checkpoints) => checkpoints.map((c) => [c.fine_tuned_model_checkpoint, j.model]))));
  for (const [model, base] of lists.flat()) baseOf.set(model, base);
  const bases = models.data.filter((m) => m.owned_by === "tuneforge").map((m) => m.id);
  const tuned = models.data.filter((m) => m.owned_by !== "tuneforge").map((m) => m.id);
  const checkpoints = lists.flat().map(([model]) => model);
  const group = (label, names) => (names.length
    ? el("optgroup", { label }, names.map((n) => el("option", { value: n, text: n }))) : null);
  setChildren($("#pg-model"), group("Fine-tuned", tuned), group("Checkpoints", checkpoints), group("Base", bases));
  setChildren($("#pg-compare"), el("option", { value: "", text: "Nothing" }), group("Base", bases),
    group("Fine-tuned", tuned), group("Checkpoints", checkpoints));
  const wanted = new URLSearchParams(window.location.search).get("model");
  const all = [...tuned, ...checkpoints, ...bases];
  $("#pg-model").value = all.includes(wanted) ? wanted : all[0] || "";
  modelChanged();
}

function modelChanged() {
  const model = $("#pg-model").value;
  const base = baseOf.get(model) || (model.startsWith("ft:") ? model.split(":")[1] : "");
  $("#pg-compare").value = base && base !== model ? base : "";
  panesChanged();
}

function panesChanged() {
  panes.a.use($("#pg-model").value);
  const other = $("#pg-compare").value;
  $("#pane-b-section").hidden = !other;
  panes.b.use(other || null);
}

async function send(event) {
  event.preventDefault();
  const error = $("#pg-error"), text = $("#pg-message").value.trim();
  error.textContent = "";
  if (!$("#pg-model").value) {
    error.textContent = "Choose a model.";
    return;
  }
  if (!text) {
    error.textContent = "Write a message first.";
    $("#pg-message").focus();
    return;
  }
  const temperature = Number($("#pg-temperature").value), maxTokens = Number($("#pg-max-tokens").value);
  if (!(temperature >= 0 && temperature <= 2)) {
    error.textContent = "Temperature: a number from 0 to 2.";
    return;
  }
  if (!(Number.isInteger(maxTokens) && maxTokens >= 1)) {
    error.textContent = "Max tokens: a whole number of at least 1.";
    return;
  }
  running = new AbortController();
  $("#pg-send").disabled = true;
  $("#pg-stop").disabled = false;
  $("#pg-message").value = "";
  const options = { system: $("#pg-system").value.trim(), temperature, maxTokens, signal: running.signal };
  const active = [panes.a, ...($("#pg-compare").value ? [panes.b] : [])];
  for (const pane of active) delete pane.status.dataset.done;
  await Promise.all(active.map((pane) => pane.send(text, options)));
  running = null;
  $("#pg-send").disabled = false;
  $("#pg-stop").disabled = true;
  $("#pg-message").focus();
}

boot(() => {
  $("#chat-form").addEventListener("submit", send);
  $("#pg-message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("#chat-form").requestSubmit();
  });
  $("#pg-model").addEventListener("change", modelChanged);
  $("#pg-compare").addEventListener("change", panesChanged);
  $("#pg-stop").addEventListener("click", () => running && running.abort());
  $("#pg-clear").addEventListener("click", () => { panes.a.clear(); panes.b.clear(); });
  loadModels().catch((e) => { $("#pg-error").textContent = e.message; });
});
