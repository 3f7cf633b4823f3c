// The public HTTP API, called with the key of this browser tab. The key lives in sessionStorage only (gone
// when the tab closes; never localStorage, never an address) and travels in the Authorization header.

const KEY_NAME = "tuneforge.apiKey";
let unauthorized = () => {};

export const session = {
  key: () => sessionStorage.getItem(KEY_NAME),
  set: (key) => sessionStorage.setItem(KEY_NAME, key),
  forget: () => sessionStorage.removeItem(KEY_NAME),
  onUnauthorized: (handler) => { unauthorized = handler; },
};

/** An error answer of the API: its envelope's message, param and code, and the HTTP status. */
export class ApiError extends Error {
  constructor(status, envelope) {
    const error = (envelope && envelope.error) || {};
    super(error.message || `The server answered HTTP ${status}`);
    this.status = status;
    this.param = error.param || null;
    this.code = error.code || null;
  }
}

/** fetch() of `path` with the key; throws ApiError for an error answer. `key` checks a key not yet kept. */
export async function request(path, { method = "GET", json, form, signal, key, headers = {} } = {}) {
  const sent = { ...headers, Authorization: `Bearer ${key || session.key() || ""}` };
  let body;
  if (json !== undefined) {
    sent["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  const response = await fetch(path, { method, headers: sent, body, signal, cache: "no-store",
                                       credentials: "omit", referrerPolicy: "no-referrer" });
  if (!response.ok) {
    let envelope = null;
    try { envelope = await response.json(); } catch { /* not JSON: a proxy's page */ }
    const error = new ApiError(response.status, envelope);
    if (response.status === 401 && !key) unauthorized(error);
    throw error;
  }
  return response;
}

export const api = {
  get: async (path, options) => (await request(path, options)).json(),
  post: async (path, json, options) => (await request(path, { ...options, method: "POST", json })).json(),
  delete: async (path, options) => (await request(path, { ...options, method: "DELETE" })).json(),
};

/** Every item of a cursor-paged list (`after` = the last item's id), up to `max`. */
export async function listAll(path, { limit = 100, max = 1000, signal } = {}) {
  const items = [];
  let after = null;
  for (;;) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api.get(`${path}${sep}limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`,
                               { signal });
    items.push(...page.data);
    if (!page.has_more || page.data.length === 0 || items.length >= max) return items;
    after = page.data[page.data.length - 1].id;
  }
}

/** Paths of the API's objects, with their ids encoded. */
export const paths = {
  job: (id) => `/v1/fine_tuning/jobs/${encodeURIComponent(id)}`,
  jobSpec: (id) => `/v1/tuneforge/jobs/${encodeURIComponent(id)}/spec`,
  file: (id) => `/v1/files/${encodeURIComponent(id)}`,
  model: (id) => `/v1/models/${id.split("/").map(encodeURIComponent).join("/")}`,
};

/** Server-sent events of a streamed completion: `onChunk(parsed)` for each `data:` line until [DONE]; an error
 * event (the stream failed after it began) is thrown as ApiError. */
export async function readStream(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(response.status, chunk);  // failed after the answer began
      onChunk(chunk);
    }
  }
}
