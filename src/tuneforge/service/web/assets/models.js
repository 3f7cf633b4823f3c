// Models page: the base models, the org's fine-tuned models (delete) and its jobs' checkpoints.
import { api, listAll, paths } from "./api.js";
import { $, boot, el, fmt, playgroundLink, say, setChildren } from "./ui.js";

const JOBS_WITH_CHECKPOINTS = 20;  // the newest jobs whose checkpoints are listed

async function load() {
  const status = $("#models-status");
  say(status, "Loading…", { busy: true });
  const [models, jobs] = await Promise.all([api.get("/v1/models"), listAll("/v1/fine_tuning/jobs", { max: 500 })]);
  const jobOf = new Map(jobs.filter((j) => j.fine_tuned_model).map((j) => [j.fine_tuned_model, j]));
  const bases = models.data.filter((m) => m.owned_by === "tuneforge");
  const tuned = models.data.filter((m) => m.owned_by !== "tuneforge");
  setChildren($("#base-models"), bases.map((m) => el("li", {}, el("span", { class: "mono", text: m.id }), " ",
    playgroundLink(m.id))));
  setChildren($("#tuned-table tbody"), tuned.map((m) => {
    const job = jobOf.get(m.id);
    return el("tr", { "data-model": m.id },
      el("td", { class: "mono", text: m.id }),
      el("td", { class: "mono", text: job ? job.model : "—" }),
      el("td", {}, job ? el("a", { href: `/jobs/${encodeURIComponent(job.id)}`, class: "mono", text: job.id }) : "—"),
      el("td", { text: fmt.date(m.created) }),
      el("td", {}, el("div", { class: "row" }, playgroundLink(m.id),
        el("button", { type: "button", class: "danger", text: "Delete", "aria-label": `Delete ${m.id}`,
                       onclick: () => remove(m.id) }))));
  }));
  $("#tuned-empty").hidden = tuned.length > 0;

  const recent = jobs.slice(0, JOBS_WITH_CHECKPOINTS);
  const lists = await Promise.all(recent.map((j) => listAll(`${paths.job(j.id)}/checkpoints`, { limit: 100 })
    .then((checkpoints) => checkpoints.map((c) => ({ ...c, job: j }))).catch(() => [])));
  const checkpoints = lists.flat();
  setChildren($("#ckpt-table tbody"), checkpoints.map((c) => el("tr", {},
    el("td", { class: "mono", text: c.fine_tuned_model_checkpoint }),
    el("td", { class: "num", text: c.step_number }),
    el("td", { class: "num", text: fmt.number(c.metrics.train_loss) }),
    el("td", { class: "num", text: fmt.number(c.metrics.valid_loss) }),
    el("td", {}, el("a", { href: `/jobs/${encodeURIComponent(c.job.id)}`, class: "mono", text: c.job.id })),
    el("td", {}, playgroundLink(c.fine_tuned_model_checkpoint)))));
  $("#ckpt-empty").hidden = checkpoints.length > 0;
  say(status, `${bases.length} base, ${tuned.length} fine-tuned, ${checkpoints.length} checkpoint model(s).`);
}

async function remove(model) {
  if (!window.confirm(`Delete ${model}? Its weights are removed from the server; this cannot be undone.`)) return;
  try {
    await api.delete(paths.model(model));
    await load();
    say($("#models-status"), `Deleted ${model}.`);
  } catch (e) {
    $("#models-error").textContent = `Not deleted: ${e.message}`;
  }
}

boot(() => load().catch((e) => { $("#models-error").textContent = e.message; }));
