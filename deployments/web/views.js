// What a generation looks like on screen: the storyboard strip, and per scene the selected
// image, every variation with its scores, the agents' iterations with a word diff, the chain,
// and cost and time where the status has them. Pure rendering: data in, elements out.
import { h, fmt } from "./dom.js";
import { wordDiff } from "./diff.js";

export const SCORERS = [
  ["pickscore", "PickScore"],
  ["clipscore", "CLIP-Score"],
  ["vqascore", "VQAScore"],
  ["aesthetic", "Aesthetic"],
];
export const DIMENSIONS = [
  ["completeness", "Completeness"],
  ["specificity", "Specificity"],
  ["professionalism", "Professionalism"],
  ["cinematography", "Cinematography"],
  ["brand_alignment", "Brand alignment"],
];

// A 0-100 value as a labelled bar; `mark` draws the quality threshold on it.
export function bar(label, value, { mark, key, cls } = {}) {
  const pct = typeof value === "number" ? Math.max(0, Math.min(100, value)) : 0;
  return h("div", { class: `bar ${cls || ""}`, dataset: key ? { score: key, value: String(value) } : undefined },
    h("span", { class: "bar-label" }, label),
    h("span", { class: "bar-track", role: "img", "aria-label": `${label} ${fmt(value)} of 100${mark !== undefined ? `, threshold ${fmt(mark, 0)}` : ""}` },
      h("span", { class: "bar-fill", style: `width:${pct}%` }),
      mark !== undefined ? h("span", { class: "bar-mark", style: `left:${Math.max(0, Math.min(100, mark))}%`, title: `quality threshold ${mark}` }) : null),
    h("span", { class: "bar-value" }, fmt(value)));
}

export function statusBadge(status) {
  return h("span", { class: `badge st-${status}` }, status);
}

// Cost and timing are additive fields (observability: pipeline/costs.py CostSummary,
// SceneTiming, GenerationTiming): a price the table lacks is "unknown" (usd null), never $0.
export function costTime(cost, timing) {
  const rows = [];
  if (cost && typeof cost === "object") {
    const usd = cost.usd === null || cost.unknown
      ? `unknown${cost.priced_usd ? ` (priced calls: ${money(cost.priced_usd)})` : ""}${cost.unpriced_models && cost.unpriced_models.length ? `; no price for ${cost.unpriced_models.join(", ")}` : ""}`
      : money(cost.usd);
    rows.push(["Cost", usd, "cost"]);
    const calls = [];
    if (cost.llm_calls) calls.push(`${cost.llm_calls} LLM calls (${cost.input_tokens ?? "?"} in / ${cost.output_tokens ?? "?"} out tokens)`);
    if (cost.images) calls.push(`${cost.images} images`);
    if (calls.length) rows.push(["Calls", calls.join(", ")]);
    const stages = Object.entries(cost.by_stage || {}).map(([stage, value]) => `${stage} ${value === null ? "unknown" : money(value)}`);
    if (stages.length) rows.push(["By stage", stages.join(", ")]);
  }
  if (timing && typeof timing === "object") {
    const stages = ["planning_s", "enhancement_s", "generation_s", "scoring_s"]
      .filter((k) => typeof timing[k] === "number").map((k) => `${k.replace(/_s$/, "")} ${timing[k].toFixed(1)} s`);
    const total = timing.total_s ?? timing.elapsed_s;
    rows.push(["Time", `${typeof total === "number" ? `${total.toFixed(1)} s` : "–"}${stages.length ? ` (${stages.join(", ")})` : ""}`, "time"]);
  }
  if (!rows.length) return null;
  return h("dl", { class: "costs" }, rows.map(([k, v, key]) => [h("dt", {}, k), h("dd", { dataset: key ? { field: key } : undefined }, v)]));
}

function money(value) {
  return typeof value === "number" ? `$${value < 0.01 && value > 0 ? value.toFixed(5) : value.toFixed(4)}` : "unknown";
}

export function strip(scenes, selectedUrl, onPick) {
  return h("ol", { class: "strip", "aria-label": "Storyboard" }, scenes.map((scene, index) => {
    const src = selectedUrl(scene);
    return h("li", { class: `strip-item st-${scene.status}` },
      index > 0 ? h("span", { class: "chain-arrow", "aria-hidden": "true" }, "→") : null,
      h("button", { type: "button", class: "strip-card", id: `strip-${scene.scene_number}`, onclick: () => onPick(scene.scene_number),
        "aria-label": `Scene ${scene.scene_number}, ${scene.status}${scene.quality_score != null ? `, quality ${fmt(scene.quality_score)}` : ""}` },
        src ? h("img", { src, alt: "", class: "strip-img" }) : h("span", { class: "strip-ph" }, scene.status === "failed" ? "failed" : "…"),
        h("span", { class: "strip-caption" }, `Scene ${scene.scene_number} · ${scene.duration} s`),
        scene.user_provided ? h("span", { class: "tag user" }, "your image") : null,
        scene.quality_score != null ? h("span", { class: "strip-score" }, fmt(scene.quality_score)) : null));
  }));
}

// One variation card: its image, rank, four scores and overall as bars, the threshold on the
// overall bar, its consistency with earlier scenes when measured, or why it failed.
export function variationCard(v, { imageSrc, threshold, selected }) {
  const title = `Variation ${v.variation}`;
  return h("figure", { class: `variation${selected ? " selected" : ""}${v.error ? " failed" : ""}`, dataset: { variation: String(v.variation) } },
    imageSrc ? h("img", { src: imageSrc, alt: `${title}${selected ? " (selected)" : ""}`, class: "var-img", loading: "eager" })
      : h("div", { class: "var-img ph" }, v.error ? "no image" : "loading…"),
    h("figcaption", {},
      h("div", { class: "var-head" },
        h("strong", {}, title),
        v.rank != null ? h("span", { class: `rank${selected ? " first" : ""}`, dataset: { rank: String(v.rank) } }, selected ? `rank ${v.rank} · selected` : `rank ${v.rank}`) : null),
      v.error ? h("p", { class: "error-text" }, `Failed: ${v.error}`) : null,
      SCORERS.map(([key, name]) => (v.scores && v.scores[key] ? bar(name, v.scores[key].score, { key }) : null)),
      v.overall != null ? bar("Overall", v.overall, { key: "overall", mark: threshold, cls: v.overall < threshold ? "overall below" : "overall" }) : null,
      v.consistency ? bar("Consistency", v.consistency.score, { key: "consistency", cls: "consistency" }) : null));
}

// The agents' loop: each iteration's prompt, the five dimension scores and the weighted
// overall, the critique and improvements, and the words that changed since the iteration before.
export function iterations(summary, idPrefix) {
  if (!summary) return null;
  if (summary.user_provided) return h("p", { class: "muted" }, "Your image is used unchanged: no prompt enhancement for this scene.");
  const items = summary.iterations || [];
  let previous = summary.original_prompt || "";
  return h("section", { class: "iterations", "aria-label": "Agent iterations" },
    h("h4", {}, `Agent iterations (${items.length})`),
    summary.stop_reason ? h("p", { class: "muted" }, `Stopped: ${summary.stop_reason}`) : null,
    items.map((it) => {
      const prompt = it.enhanced_prompt;
      const before = previous;
      if (prompt) previous = prompt;
      const score = it.scores ? it.scores.overall : null;
      return h("details", { class: "iteration", id: `${idPrefix}-it-${it.iteration}`, dataset: { iteration: String(it.iteration) } },
        h("summary", {}, `Iteration ${it.iteration}`, score != null ? ` · prompt score ${fmt(score)}` : "",
          it.error ? h("span", { class: "tag bad" }, it.failed_agent === "cinematographer" ? "agent 1 failed" : "agent 2 failed") : null),
        it.error ? h("p", { class: "error-text" }, it.error) : null,
        prompt ? h("div", { class: "diff", "aria-label": "Changes from the previous prompt" },
          h("h5", {}, it.iteration === 1 ? "Changes from the scene's original prompt" : `Changes from iteration ${it.iteration - 1}`),
          h("p", {}, wordDiff(before, prompt).map((run) => [
            run.op === "same" ? run.text : h(run.op === "add" ? "ins" : "del", {}, run.text), " "]))) : null,
        it.scores ? h("div", { class: "dims" },
          DIMENSIONS.map(([key, name]) => bar(name, it.scores[key], { key })),
          bar("Overall (weighted)", it.scores.overall, { key: "overall", cls: "overall" })) : null,
        it.critique ? h("div", {}, h("h5", {}, "Critique"), h("p", { class: "critique" }, it.critique)) : null,
        it.improvements && it.improvements.length ? h("div", {}, h("h5", {}, "Suggested improvements"),
          h("ul", {}, it.improvements.map((x) => h("li", {}, x)))) : null,
        it.dropped_markers && it.dropped_markers.length ? h("p", { class: "error-text" }, `Refused: dropped markers: ${it.dropped_markers.join("; ")}`) : null);
    }));
}

// Which image a scene was generated from: scene 1 from the prompt alone (or is the user's
// image), later scenes from the previous scene's selected image.
export function chainText(scene, previous, variationsMeta) {
  if (scene.user_provided) return "This is your image, used unchanged as scene 1 and as the reference for scene 2.";
  if (!previous) return "Generated from the prompt alone (the first scene has no reference image).";
  const used = variationsMeta && variationsMeta.some((v) => v.provider_metadata && v.provider_metadata.reference_used);
  const from = previous.user_provided ? "your image (scene 1)" : `scene ${previous.scene_number}'s selected image${previous.selected ? ` (${previous.selected})` : ""}`;
  return variationsMeta && variationsMeta.length && !used
    ? `Chained after ${from}, but the image provider did not use a reference image.`
    : `Generated from ${from}.`;
}
