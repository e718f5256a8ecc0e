// The viewer's pages, chosen by the URL's hash: #/ (my generations), #/new (submit one),
// #/g/{id} (one generation, live). The token lives in sessionStorage: it goes when the tab
// closes, and the page never sends it anywhere but this service's /api.
import { h, clear } from "./dom.js";
import { claims, getJson, listGenerations, onAuthFailure, request, session, tokenProblem } from "./api.js";
import { showGeneration } from "./generation.js";
import { statusBadge } from "./views.js";

const main = document.getElementById("main");
const banner = document.getElementById("banner");
let stopFollowing = null; // stops the generation page's live feed

function say(message, kind = "error") {
  banner.hidden = !message;
  banner.className = `banner ${kind}`;
  banner.textContent = message || "";
}

function mineKey() {
  const c = claims(session.token) || {};
  return `sceneref.mine.${c.sub || "?"}`;
}
function remember(id) {
  const ids = JSON.parse(localStorage.getItem(mineKey()) || "[]").filter((x) => x !== id);
  localStorage.setItem(mineKey(), JSON.stringify([id, ...ids].slice(0, 50)));
}
function remembered() {
  return JSON.parse(localStorage.getItem(mineKey()) || "[]");
}

onAuthFailure((error) => {
  session.token = "";
  showSignIn(error.message);
});

function showWho() {
  const who = clear(document.getElementById("who"));
  const c = claims(session.token);
  if (!session.token || !c) return;
  const expires = typeof c.exp === "number" ? new Date(c.exp * 1000) : null;
  who.append(h("span", {}, `Signed in as ${c.sub}`, expires ? h("span", { class: "muted" }, ` · token until ${expires.toLocaleTimeString()}`) : null),
    h("button", { type: "button", class: "link", id: "sign-out", onclick: () => { session.token = ""; showSignIn("Signed out."); } }, "Sign out"));
}

function showSignIn(message) {
  stop();
  showWho();
  say(message || "");
  const input = h("textarea", { id: "token", name: "token", rows: 4, required: true, autocomplete: "off", spellcheck: "false",
    "aria-describedby": "token-help" });
  const form = h("form", { class: "card signin", onsubmit: (event) => {
    event.preventDefault();
    const token = input.value.trim();
    const problem = tokenProblem(token);
    if (problem) { say(problem); input.focus(); return; }
    session.token = token;
    say("");
    route();
  } },
  h("h1", {}, "Sign in"),
  h("label", { for: "token" }, "Paste your access token"),
  input,
  h("p", { id: "token-help", class: "muted" },
    "A JWT from your identity provider, or on a development setup ", h("code", {}, "make -s token SUB=yourname"),
    ". It is kept only in this browser tab (sessionStorage) and sent only to this service."),
  h("button", { type: "submit", id: "sign-in" }, "Sign in"));
  clear(main).append(form);
  input.focus();
}

function stop() {
  if (stopFollowing) stopFollowing();
  stopFollowing = null;
}

async function route() {
  stop();
  const problem = session.token ? tokenProblem(session.token) : "You are not signed in: paste a token.";
  if (problem) { session.token = ""; return showSignIn(problem === "You are not signed in: paste a token." ? "" : problem); }
  showWho();
  say("");
  const hash = location.hash.replace(/^#/, "") || "/";
  const match = hash.match(/^\/g\/([A-Za-z0-9_-]{1,64})$/);
  if (match) { stopFollowing = showGeneration(match[1], { main, say }); return; }
  if (hash === "/new") return showNew();
  return showList();
}

// --- my generations -------------------------------------------------------------------

async function showList() {
  const body = h("div", { id: "list-body" }, h("p", { class: "muted" }, "Loading…"));
  const open = h("input", { id: "open-id", name: "open-id", placeholder: "generation id", pattern: "[A-Za-z0-9_-]{1,64}", "aria-label": "Generation id" });
  clear(main).append(h("section", { class: "card" },
    h("div", { class: "row spread" }, h("h1", {}, "My generations"), h("a", { class: "button", href: "#/new", id: "new-link" }, "New generation")),
    h("form", { class: "row", onsubmit: (e) => { e.preventDefault(); if (open.value.trim()) location.hash = `#/g/${open.value.trim()}`; } },
      open, h("button", { type: "submit" }, "Open")),
    body));
  let items;
  let next = null;
  let note = null;
  try {
    ({ items, next } = await listGenerations());
  } catch (err) {
    if (err.status === 401) return;
    // The list route is newer than the status route: without it, show the generations this
    // browser submitted, each read from its status.
    note = "The service does not list generations; these are the ones submitted from this browser.";
    items = [];
    for (const id of remembered()) {
      try {
        const s = await getJson(`api/status/${id}`);
        const scenes = s.storyboard_plan.scenes;
        items.push({ generation_id: id, status: s.status, progress: s.progress, scene_count: scenes.length,
          scenes_completed: scenes.filter((x) => x.status === "completed").length, error: s.error });
      } catch { /* gone or not ours */ }
    }
  }
  const list = h("ul", { class: "gen-list", id: "generations" });
  const more = h("button", { type: "button", id: "more", class: "secondary", onclick: async () => {
    more.disabled = true;
    try {
      const page = await listGenerations(next);
      next = page.next;
      list.append(...page.items.map(listItem));
    } catch (err) { if (err.status !== 401) say(err.message); }
    more.disabled = false;
    more.hidden = !next;
  } }, "Show older");
  more.hidden = !next;
  list.append(...items.map(listItem));
  clear(body).append(note ? h("p", { class: "muted" }, note) : "",
    ...(items.length ? [list, more] : [h("p", { id: "no-generations" }, "No generations yet.")]));
}

function listItem(g) {
  return h("li", { dataset: { generation: g.generation_id } },
    h("a", { href: `#/g/${g.generation_id}` }, g.prompt ? (g.prompt.length > 90 ? `${g.prompt.slice(0, 90)}…` : g.prompt) : g.generation_id),
    " ", statusBadge(g.status), g.offline ? h("span", { class: "tag offline" }, "offline demo") : null,
    h("div", { class: "muted small" }, `${g.progress ?? "?"}%`,
      g.scene_count != null ? ` · ${g.scenes_completed ?? "?"} of ${g.scene_count} scenes` : "",
      g.created_at ? ` · ${new Date(g.created_at).toLocaleString()}` : "",
      g.error ? h("span", { class: "error-text" }, ` · ${g.error}`) : null));
}

// --- a new generation ---------------------------------------------------------------------

function field(id, labelText, input, help) {
  input.id = id;
  input.name = id;
  return h("div", { class: "field" }, h("label", { for: id }, labelText), input, help ? h("small", { class: "muted" }, help) : null);
}

function showNew() {
  const number = (value, min, max, step = 1) => h("input", { type: "number", value, min, max, step, required: true });
  const form = h("form", { class: "card", id: "new-form", onsubmit: submit },
    h("h1", {}, "New generation"),
    field("prompt", "Prompt", h("textarea", { rows: 3, minlength: 10, maxlength: 2000, required: true }), "10 to 2000 characters: what the video is about."),
    field("target_duration", "Duration (seconds)", number(15, 9, 60), "9-60 s: 3 scenes up to 12 s, 4 up to 20 s, 5 up to 30 s, then about one per 6 s."),
    h("fieldset", {}, h("legend", {}, "Advanced settings"),
      field("advanced_image_num_variations", "Variations per scene", number(4, 2, 8)),
      field("advanced_image_max_enhancement_iterations", "Max enhancement iterations", number(4, 1, 6)),
      field("advanced_image_quality_threshold", "Quality threshold (0-100)", number(30, 0, 100, "any"))),
    field("image", "Your image as scene 1 (optional)", h("input", { type: "file", accept: "image/png,image/jpeg,image/webp" }), "PNG, JPEG or WEBP; used unchanged."),
    h("button", { type: "submit", id: "submit" }, "Generate"));
  clear(main).append(form);
  form.querySelector("#prompt").focus();

  async function submit(event) {
    event.preventDefault();
    const get = (id) => form.querySelector(`#${id}`);
    const values = {
      prompt: get("prompt").value,
      target_duration: Number(get("target_duration").value),
      advanced_image_num_variations: Number(get("advanced_image_num_variations").value),
      advanced_image_max_enhancement_iterations: Number(get("advanced_image_max_enhancement_iterations").value),
      advanced_image_quality_threshold: Number(get("advanced_image_quality_threshold").value),
    };
    const file = get("image").files[0];
    const button = get("submit");
    button.disabled = true;
    say("Submitting…", "info");
    try {
      let response;
      if (file) {
        const data = new FormData();
        for (const [k, v] of Object.entries(values)) data.append(k, String(v));
        data.append("image", file);
        response = await request("POST", "api/generate-with-image", { form: data });
      } else {
        response = await request("POST", "api/generate", { json: values });
      }
      const accepted = await response.json();
      remember(accepted.generation_id);
      say("");
      location.hash = `#/g/${accepted.generation_id}`;
    } catch (err) {
      if (err.status !== 401) say(err.message);
    } finally {
      button.disabled = false;
    }
  }
}

window.addEventListener("hashchange", route);
route();
