// DOM helpers shared by the pages, and the key flow every page starts with. Text from the API is only ever
// set as text (textContent), never parsed as HTML.
import { api, request, session } from "./api.js";

export const $ = (selector, root = document) => root.querySelector(selector);

/** An element: `props` are attributes (class, href, ...) except `text` (its text) and `on*` (listeners). */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child !== undefined && child !== null && child !== false) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

export function setChildren(node, ...children) {
  node.replaceChildren(...children.flat(Infinity).filter((c) => c !== undefined && c !== null && c !== false));
}

export function say(node, text, { busy = false } = {}) {
  node.textContent = text;
  node.classList.toggle("busy", busy);
}

const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
const timeFormat = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });

export const fmt = {
  date: (unix) => (unix ? dateFormat.format(new Date(unix * 1000)) : "—"),
  time: (unix) => (unix ? timeFormat.format(new Date(unix * 1000)) : ""),
  iso: (unix) => (unix ? new Date(unix * 1000).toISOString() : ""),
  number: (n, digits = 4) => (n === null || n === undefined ? "—" : Number(n).toLocaleString(undefined,
    { maximumSignificantDigits: digits })),
  count: (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString()),
  megabytes: (mb) => (mb === null || mb === undefined ? "—" : mb >= 1024 ? `${(mb / 1024).toFixed(2)} GiB`
    : `${Math.round(mb).toLocaleString()} MiB`),
  bytes: (n) => (n < 1024 ? `${n} B` : n < 2 ** 20 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 2 ** 20).toFixed(1)} MiB`),
  seconds: (s) => {
    if (s === null || s === undefined) return "—";
    if (s < 1) return `${(s * 1000).toPrecision(2)} ms`;
    if (s < 90) return `${s.toPrecision(3)} s`;
    if (s < 5400) return `${(s / 60).toFixed(1)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  },
  percent: (x) => `${Math.round(x * 100)} %`,
};

export const STATUS_LABELS = {
  validating_files: "validating files", queued: "queued", running: "running", paused: "paused",
  succeeded: "succeeded", failed: "failed", cancelled: "cancelled",
};
export const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

export function badge(status) {
  return el("span", { class: `badge ${status}`, text: STATUS_LABELS[status] || status });
}

/** A link to try `model` in the playground (a model name in an address is fine; a key never is). */
export function playgroundLink(model, text = "Try") {
  return el("a", { href: `/playground?model=${encodeURIComponent(model)}`, text,
                   "aria-label": `${text}: ${model} in the playground` });
}

/** Download a file of the Files API (it needs the key, so it is fetched, then saved from a blob). */
export async function downloadFile(fileId, filename) {
  const response = await request(`/v1/files/${encodeURIComponent(fileId)}/content`);
  const url = URL.createObjectURL(await response.blob());
  const link = el("a", { href: url, download: filename || fileId });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/**
 * Show the page once a key is set: the key panel first when there is none (checked against the API before
 * it is kept, so a wrong key is refused at once), then `start()`. A key the API refuses later (deleted)
 * brings the panel back.
 */
export function boot(start) {
  const panel = $("#key-panel"), main = $("#main"), status = $("#key-status");
  const input = $("#key-input"), error = $("#key-error");
  let started = false;

  const askForKey = (message = "") => {
    main.hidden = true;
    status.hidden = true;
    panel.hidden = false;
    error.textContent = message;
    input.focus();
  };
  const show = () => {
    panel.hidden = true;
    main.hidden = false;
    status.hidden = false;
    if (!started) {
      started = true;
      start();
    }
  };

  session.onUnauthorized((e) => {
    session.forget();
    askForKey(`The server refused this tab's key: ${e.message}. Enter another.`);
  });
  $("#key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      error.textContent = "Enter an API key.";
      input.focus();
      return;
    }
    say(error, "Checking the key…");
    try {
      await api.get("/v1/models", { key });
    } catch (e) {
      error.textContent = e.status === 401 ? `This key was refused: ${e.message}` : `Could not check the key: ${e.message}`;
      input.select();
      return;
    }
    session.set(key);
    input.value = "";
    error.textContent = "";
    show();
    main.focus();
  });
  $("#key-forget").addEventListener("click", () => {
    session.forget();
    window.location.reload();  // drops everything this tab fetched with the key
  });
  if (session.key()) show();
  else askForKey();
}
