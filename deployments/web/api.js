// The API as the viewer uses it: the token from sessionStorage on every call, errors turned into
// sentences a person can act on, and a live feed that prefers the server-sent-events stream and
// falls back to polling the status when the stream is not there (or drops).
const TOKEN_KEY = "sceneref.token";

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

export const session = {
  get token() { return sessionStorage.getItem(TOKEN_KEY) || ""; },
  set token(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  },
};

// The token's claims, read without verifying (the server verifies): to greet the user by
// `sub` and to say "expired" before a request is even sent.
export function claims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = decodeURIComponent(escape(atob(part + "=".repeat((4 - (part.length % 4)) % 4))));
    return JSON.parse(json);
  } catch {
    return null;
  }
}

export function tokenProblem(token) {
  const c = claims(token);
  if (!c) return "That does not look like a token (three dot-separated parts). Paste the whole token.";
  if (typeof c.exp === "number" && c.exp * 1000 < Date.now()) return "Your token expired, paste a new one.";
  return null;
}

// Listeners told when the server refuses the token, so the page can ask for a new one.
const authListeners = new Set();
export function onAuthFailure(fn) { authListeners.add(fn); }

export function url(path) {
  return new URL(path.replace(/^\//, ""), document.baseURI).toString();
}

export async function request(method, path, { json, form, accept } = {}) {
  const headers = { Authorization: `Bearer ${session.token}` };
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  if (form !== undefined) body = form;
  if (accept) headers.Accept = accept;
  let response;
  try {
    response = await fetch(url(path), { method, headers, body, cache: "no-store" });
  } catch {
    throw new ApiError(0, "The service cannot be reached. Check your connection and try again.");
  }
  if (response.ok) return response;
  let data = null;
  try { data = await response.json(); } catch { /* not JSON */ }  // a Problem (application/problem+json)
  const error = new ApiError(response.status, explain(response, data), data);
  if (response.status === 401) authListeners.forEach((fn) => fn(error));
  throw error;
}

export async function getJson(path) {
  return (await request("GET", path)).json();
}

// A sentence for each error the API documents (docs/serving.md).
export function explain(response, data) {
  const detail = data && typeof data.detail === "string" ? data.detail : "";
  const retry = response.headers.get("Retry-After");
  const later = retry ? ` Try again in ${retry} s.` : "";
  switch (response.status) {
    case 401:
      if (/expired/i.test(detail)) return "Your token expired, paste a new one.";
      if (/missing/i.test(detail)) return "You are not signed in: paste a token.";
      return `The service did not accept your token (${detail || "invalid token"}). Paste a new one.`;
    case 404: return detail.startsWith("generation") ? "This generation does not exist, or it is not yours." : (detail || "Not found.");
    case 409: return detail || "The generation cannot do that in its current state.";
    case 413: return "The image is too large for the service. Choose a smaller one.";
    case 415: return "The image must be a PNG, JPEG or WEBP file.";
    case 422:
      if (data && Array.isArray(data.errors)) {  // a Problem's field errors (docs/serving.md, Errors)
        return "Please fix: " + data.errors.map((f) => (f.field ? `${f.field}: ${f.message}` : f.message)).join("; ");
      }
      return detail || "The request is invalid.";
    case 429: return `${detail || "You have too many generations running."}${later}`;
    case 503: return `${detail || "The service is busy or starting."}${later}`;
    default: return detail || `The service answered ${response.status}.`;
  }
}

export async function listGenerations(cursor) {
  // The caller's generations, newest first, a page at a time ({generations, next_cursor}). An
  // older service without the route answers 404 or 405: the caller then shows the generations
  // this browser submitted.
  const data = await getJson(`api/generations?limit=20${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
  const items = Array.isArray(data) ? data : data.generations || [];
  return { items: items.map((g) => ({ ...g, generation_id: g.generation_id || g.id })), next: data.next_cursor || null };
}

// Follows one generation live. `onEvent(kind, data)` gets each stream event; `onStatus(status)`
// gets a fresh status after events (throttled) and at the end. Returns a stop() function.
export function follow(generationId, { onEvent, onStatus, onMode, onError }) {
  const controller = new AbortController();
  let stopped = false;
  let lastId = null;
  let pending = null;
  const finished = (s) => ["completed", "failed", "cancelled"].includes(s && s.status);

  const refresh = async () => {
    const status = await getJson(`api/status/${generationId}`);
    if (!stopped) onStatus(status);
    return status;
  };
  const refreshSoon = () => {
    if (pending) return;
    pending = setTimeout(async () => {
      pending = null;
      try { await refresh(); } catch (err) { onError(err); }
    }, 400);
  };

  async function poll() {
    onMode("polling");
    while (!stopped) {
      try {
        if (finished(await refresh())) return;
      } catch (err) {
        onError(err);
        if (err.status === 401 || err.status === 404) return;
      }
      await new Promise((r) => setTimeout(r, 1500));
    }
  }

  async function stream() {
    // fetch, not EventSource: EventSource cannot send the Authorization header.
    for (let attempt = 0; !stopped && attempt < 20; attempt++) {
      const headers = { Authorization: `Bearer ${session.token}`, Accept: "text/event-stream" };
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      let response;
      try {
        response = await fetch(url(`api/generations/${generationId}/events`), { headers, signal: controller.signal, cache: "no-store" });
      } catch {
        if (stopped) return;
        return poll();
      }
      const type = response.headers.get("Content-Type") || "";
      if (!response.ok || !type.startsWith("text/event-stream")) return poll();
      onMode("live");
      const ended = await readEvents(response.body, (event) => {
        if (event.id !== undefined) lastId = event.id;
        let data = event.data;
        try { data = JSON.parse(event.data); } catch { /* keep text */ }
        onEvent(event.event || "message", data);
        refreshSoon();
        return finished(data) || event.event === "status" && finished(data);
      }).catch(() => false);
      if (stopped) return;
      const status = await refresh().catch(() => null);
      if (ended || finished(status)) return;
      // The server bounds each stream; reconnect where it left off.
    }
    return poll();
  }

  refresh().then((status) => { if (!finished(status)) stream(); }).catch((err) => onError(err));
  return () => { stopped = true; controller.abort(); if (pending) clearTimeout(pending); };
}

// Parses a text/event-stream body; `handle(event)` returns true when the stream's last event
// (the final status) has arrived. Resolves true then, false when the server closed first.
async function readEvents(body, handle) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const event = { data: "" };
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") data.push(text);
        else if (field === "id") event.id = text;
        else if (field === "event") event.event = text;
      }
      if (!data.length && event.id === undefined) continue;
      event.data = data.join("\n");
      if (handle(event)) { reader.cancel().catch(() => {}); return true; }
    }
  }
}
