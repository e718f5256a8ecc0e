// The viewer's pages, chosen by the URL's hash: #/ (my generations), #/new (submit one),
// #/g/{id} (one generation, live). The token lives in sessionStorage: it goes when the tab
// closes, and the page never sends it anywhere but this service's /api.
import { h, clear, fmt } from "./dom.js";
import { ApiError, claims, follow, getJson, listGenerations, onAuthFailure, request, session, tokenProblem, url } from "./api.js";
import { chainText, costTime, iterations, statusBadge, strip, variationCard } from "./views.js";

const main = document.getElementById("main");
const banner = document.getElementById("banner");
let stopFollowing = null;
let page = null; // the generation page's state while it is shown

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
  page = null;
}

async function route() {
  stop();
  const problem = session.token ? tokenProblem(session.token) : "You are not signed in: paste a token.";
  if (problem) { session.token = ""; return showSignIn(problem === "You are not signed in: paste a token." ? "" : problem); }
  showWho();
  say("");
  const hash = location.hash.replace(/^#/, "") || "/";
  const match = hash.match(/^\/g\/([A-Za-z0-9_-]{1,64})$/);
  if (match) return showGeneration(match[1]);
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

// --- one generation -------------------------------------------------------------------------

async function showGeneration(id) {
  page = { id, status: null, files: null, docs: new Map(), blobs: new Map(), selected: new Map(), events: [], now: new Map(), mode: "connecting", loading: new Set() };
  const state = page;
  clear(main).append(h("p", { class: "muted" }, "Loading…"));
  stopFollowing = follow(id, {
    onStatus: (status) => { state.status = status; render(state); loadTraces(state); },
    onEvent: (kind, data) => {
      state.events.push(describe(kind, data));
      state.events = state.events.slice(-40);
      const scene = data && typeof data === "object" ? data.scene : null;
      if (scene != null && data.message) state.now.set(scene, data.message);
      render(state);
    },
    onMode: (mode) => { state.mode = mode; render(state); },
    onError: (err) => {
      if (err.status === 401) return;
      if (err.status === 404 && !state.status) {
        clear(main).append(h("section", { class: "card", id: "not-found" }, h("h1", {}, "Not found"), h("p", {}, err.message), h("a", { href: "#/" }, "My generations")));
        if (page === state) stop();
        return;
      }
      say(err.message);
    },
  });
}

// One event as a line of text: the runner's own message (it names the scene), else its kind.
function describe(kind, data) {
  if (data && typeof data === "object") {
    const scene = data.scene ?? data.scene_number;
    const text = data.message || `${scene != null ? `scene ${scene}: ` : ""}${data.stage || data.status || kind}`;
    return `${text}${typeof data.progress === "number" ? ` (${data.progress}%)` : ""}`;
  }
  return `${kind}: ${data}`;
}

async function loadTraces(state) {
  const status = state.status;
  if (!status) return;
  if (state.loading.has("listing")) { state.relist = true; return; } // once more when this one ends
  state.loading.add("listing");
  state.relist = false;
  try {
    const listing = await getJson(`api/generations/${state.id}/traces`);
    state.files = new Set(listing.files);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) state.files = state.files || new Set();
    state.loading.delete("listing");
    render(state);
    if (state.relist) loadTraces(state);
    return;
  }
  state.loading.delete("listing");
  if (state.relist) setTimeout(() => loadTraces(state), 0);
  const wanted = [];
  for (const name of state.files) {
    if (/^scene_\d+\/(quality_scores|prompt_trace_summary)\.json$/.test(name) && !state.docs.has(name)) wanted.push(name);
  }
  await Promise.all(wanted.map(async (name) => {
    if (state.loading.has(name)) return;
    state.loading.add(name);
    try { state.docs.set(name, await getJson(`api/generations/${state.id}/traces/${name}`)); } catch { /* try again later */ }
    state.loading.delete(name);
  }));
  // Variation images: read with the token, shown from blobs (the trace route is not signed).
  for (const [name, doc] of state.docs) {
    if (!name.endsWith("quality_scores.json")) continue;
    const scene = name.split("/")[0];
    for (const v of doc.variations || []) {
      const file = v.image && `${scene}/${v.image}`;
      if (!file || state.blobs.has(file) || state.loading.has(file)) continue;
      state.loading.add(file);
      request("GET", `api/generations/${state.id}/traces/${file}`).then((r) => r.blob())
        .then((blob) => { state.blobs.set(file, URL.createObjectURL(blob)); render(state); })
        .catch(() => {}).finally(() => state.loading.delete(file));
    }
  }
  render(state);
}

let renderQueued = false;
function render(state) {
  if (page !== state || renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; if (page === state) draw(state); });
}

// Redraws the page from the state, keeping focus and open details across redraws.
function draw(state) {
  const status = state.status;
  if (!status) return;
  const focused = focusKey(document.activeElement);
  const open = new Set([...main.querySelectorAll("details[open]")].map((d) => d.id));
  const plan = status.storyboard_plan;
  const threshold = plan.advanced_image_settings.quality_threshold;
  const scenes = plan.scenes;
  const running = status.status === "queued" || status.status === "running";
  const firstPending = scenes.find((s) => s.status !== "completed");
  for (const s of scenes) {
    if (s.reference_image_url && !state.selected.has(s.scene_number)) state.selected.set(s.scene_number, s.reference_image_url);
  }
  const view = h("div", { class: "generation", dataset: { generation: state.id, status: status.status } },
    h("section", { class: "card head" },
      h("div", { class: "row spread" },
        h("h1", {}, "Generation ", h("code", { class: "gid" }, state.id.slice(0, 12))),
        h("span", {}, statusBadge(status.status), status.offline ? h("span", { class: "tag offline", title: "offline demo providers: procedural images, deterministic agents" }, "offline demo") : null)),
      h("div", { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": status.progress, "aria-label": "Progress" },
        h("span", { style: `width:${status.progress}%` })),
      h("p", { class: "muted", id: "live-mode" }, `${status.progress}% · `,
        running ? (state.mode === "live" ? "live (server-sent events)" : state.mode === "polling" ? "live (polling the status)" : "connecting…") : "finished",
        ` · ${scenes.length} scenes · threshold ${fmt(threshold, 0)} · ${plan.advanced_image_settings.num_variations} variations`),
      status.error ? h("p", { class: "error-text", id: "gen-error", role: "alert" }, `This generation ${status.status === "cancelled" ? "was cancelled" : "failed"}: ${status.error}`) : null,
      costTime(status.cost, status.timing),
      h("div", { class: "row" },
        running ? h("button", { type: "button", id: "cancel", onclick: () => act(state, "DELETE", `api/generations/${state.id}`) }, "Cancel") : null,
        ["failed", "cancelled"].includes(status.status) ? h("button", { type: "button", id: "resume", onclick: () => act(state, "POST", `api/generations/${state.id}/resume`) }, "Resume") : null)),
    scenes.length ? strip(scenes.map((s) => ({ ...s, status: s.status === "completed" ? "completed" : (s === firstPending && status.status === "failed" ? "failed" : s.status) })),
      (s) => state.selected.get(s.scene_number), (n) => { const el = document.getElementById(`scene-${n}`); el.scrollIntoView({ block: "start" }); el.focus(); })
      : h("p", { class: "muted" }, "Planning the storyboard…"),
    running && state.events.length ? h("section", { class: "card events", "aria-label": "Live activity" },
      h("h2", {}, "Live activity"), h("ol", { id: "events", "aria-live": "polite" }, state.events.slice(-8).map((e) => h("li", {}, e)))) : null,
    scenes.map((scene, index) => sceneView(state, scene, scenes[index - 1], threshold, status, scene === firstPending)));
  clear(main).append(view);
  for (const id of open) { const d = document.getElementById(id); if (d) d.open = true; }
  const again = focused && findFocus(focused);
  if (again) again.focus({ preventScroll: true });
}

// Where the focus is, by ids that survive a redraw: the element's own id, or its nearest
// ancestor's id and its tag (an iteration's <summary> is found again inside its <details>).
function focusKey(el) {
  if (!el || el === document.body || !main.contains(el)) return null;
  if (el.id) return { id: el.id };
  const holder = el.parentElement && el.parentElement.closest("[id]");
  return holder && holder !== main ? { id: holder.id, tag: el.tagName.toLowerCase() } : null;
}

function findFocus(key) {
  const holder = document.getElementById(key.id);
  return holder && key.tag ? holder.querySelector(key.tag) : holder;
}

async function act(state, method, path) {
  try {
    await request(method, path);
    say("");
    if (method === "POST") { stop(); showGeneration(state.id); }
  } catch (err) {
    if (err.status !== 401) say(err.message);
  }
}

function sceneView(state, scene, previous, threshold, status, isNext) {
  const n = scene.scene_number;
  const quality = state.docs.get(`scene_${n}/quality_scores.json`);
  const summary = state.docs.get(`scene_${n}/prompt_trace_summary.json`);
  const variations = quality ? quality.variations || [] : [];
  const best = variations.find((v) => v.rank === 1);
  const prevQuality = previous && state.docs.get(`scene_${previous.scene_number}/quality_scores.json`);
  const prevBest = prevQuality && (prevQuality.variations || []).find((v) => v.rank === 1);
  const done = scene.status === "completed";
  const failedHere = isNext && status.status === "failed";
  const selectedSrc = state.selected.get(n);
  return h("article", { class: "card scene", id: `scene-${n}`, tabindex: "-1", dataset: { scene: String(n), status: done ? "completed" : scene.status } },
    h("div", { class: "row spread" },
      h("h2", {}, `Scene ${n}`, h("span", { class: "muted" }, ` · ${scene.duration} s`)),
      h("span", {}, done ? statusBadge("completed") : failedHere ? statusBadge("failed") : statusBadge(scene.status),
        scene.below_threshold ? h("span", { class: "tag bad", title: `best overall below the threshold ${threshold}` }, "below threshold") : null)),
    !done && !failedHere && state.now.has(n) && ["queued", "running"].includes(status.status)
      ? h("p", { class: "now" }, h("span", { class: "muted" }, "Now: "), state.now.get(n)) : null,
    failedHere ? h("p", { class: "error-text", role: "alert" }, `This scene failed: ${status.error || "no reason was recorded"}`) : null,
    h("p", { class: "prompt" }, h("span", { class: "muted" }, "Scene prompt: "), scene.prompt),
    done ? h("div", { class: "selected-wrap" },
      h("figure", { class: "selected-img" },
        h("img", { src: selectedSrc, alt: scene.user_provided ? `Scene ${n}: your image` : `Scene ${n}: selected image`, class: "big" }),
        h("figcaption", {}, scene.user_provided ? h("span", { class: "tag user" }, "your image (used unchanged)")
          : ["Selected", best ? `: variation ${best.variation}` : "", " · overall ", h("strong", { class: "scene-quality", dataset: { value: String(scene.quality_score) } }, fmt(scene.quality_score)),
            ` (threshold ${fmt(threshold, 0)})`, scene.prompt_score != null ? ` · prompt score ${fmt(scene.prompt_score)}` : "",
            scene.consistency_score != null ? ` · consistency ${fmt(scene.consistency_score)}` : ""])),
      h("div", { class: "chain" }, h("h4", {}, "Chain"),
        previous && state.selected.get(previous.scene_number) ? h("img", { src: state.selected.get(previous.scene_number), alt: `Reference: scene ${previous.scene_number}'s image`, class: "chain-img" }) : null,
        h("p", {}, chainText(scene, previous && { ...previous, selected: prevBest ? `variation ${prevBest.variation}` : null }, variations)),
        costTime(scene.cost, scene.timing))) : null,
    scene.enhanced_prompt ? h("details", { id: `scene-${n}-final` }, h("summary", {}, "Final enhanced prompt"), h("p", {}, scene.enhanced_prompt)) : null,
    variations.length ? h("section", { class: "variations", "aria-label": `Scene ${n} variations` },
      h("h3", {}, `Variations (${variations.length})`, quality.scoring && quality.scoring.formula ? h("small", { class: "muted" }, ` · overall = ${quality.scoring.formula}`) : null),
      h("div", { class: "var-grid" }, variations.map((v) => variationCard(v, {
        imageSrc: v.image ? state.blobs.get(`scene_${n}/${v.image}`) : null, threshold, selected: v.rank === 1 })))) :
      done && !scene.user_provided ? h("p", { class: "muted" }, state.files && state.files.size === 0
        ? "The trace files of this generation were removed (the service keeps them only with traces.keep), so the variations cannot be shown."
        : "Loading variations…") : null,
    iterations(summary, `scene-${n}`));
}

window.addEventListener("hashchange", route);
route();
