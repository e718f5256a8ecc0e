// One generation's page, live while it runs: the status (from the event stream or polling),
// its trace files (variations, scores, iterations) and the images, redrawn as they arrive.
import { h, clear, fmt } from "./dom.js";
import { ApiError, follow, getJson, request } from "./api.js";
import { chainText, costTime, iterations, statusBadge, strip, variationCard } from "./views.js";

let page = null; // the shown generation's state
let main = null;
let say = () => {};

// Shows generation `id` in `ctx.main`; returns the function that stops following it.
export function showGeneration(id, ctx) {
  ({ main, say } = ctx);
  page = { id, status: null, files: null, docs: new Map(), blobs: new Map(), selected: new Map(), events: [], now: new Map(), mode: "connecting", loading: new Set() };
  const state = page;
  clear(main).append(h("p", { class: "muted" }, "Loading…"));
  const stopFollow = follow(id, {
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
        state.stop();
        return;
      }
      say(err.message);
    },
  });
  state.stop = () => { stopFollow(); if (page === state) page = null; };
  return state.stop;
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
    if (method === "POST") window.dispatchEvent(new HashChangeEvent("hashchange")); // follow the resumed run
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

