"""Trace files that explain why each image was chosen, in the guide's layout:

    {root}/{generation_id}/scene_{n}/
        00_original_prompt.txt
        01_agent1_iteration_1.txt  02_agent2_iteration_1.txt  03_agent1_iteration_2.txt ...
        final_enhanced_prompt.txt  prompt_trace_summary.json
        image_1.png .. image_{N}.png  quality_scores.json  selected_best.txt

Agent 1's iteration i is file 2i-1, agent 2's is file 2i. The JSON files are documented in
docs/traces.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.schemas import EnhancementResult, IterationRecord, SceneResult, VariationResult


class TraceWriter:
    def __init__(self, root: Path, generation_id: str):
        self.dir = Path(root) / generation_id

    def scene_dir(self, scene_number: int) -> Path:
        path = self.dir / f"scene_{scene_number}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _write(self, scene_number: int, name: str, text: str) -> None:
        (self.scene_dir(scene_number) / name).write_text(text, encoding="utf-8")

    def original_prompt(self, scene_number: int, prompt: str) -> None:
        self._write(scene_number, "00_original_prompt.txt", prompt + "\n")

    def enhancement(self, scene_number: int, result: EnhancementResult) -> None:
        for record in result.iterations:
            i = record.iteration
            self._write(scene_number, f"{2 * i - 1:02d}_agent1_iteration_{i}.txt", _agent1_text(record))
            if record.scores is not None or record.error:
                self._write(scene_number, f"{2 * i:02d}_agent2_iteration_{i}.txt", _agent2_text(record))
        self._write(scene_number, "final_enhanced_prompt.txt", result.final_prompt + "\n")
        summary = {
            "original_prompt": result.original_prompt,
            "final_prompt": result.final_prompt,
            "initial_scores": _scores(result.initial_scores, result.initial_overall),
            "final_scores": _scores(result.final_scores, result.final_overall),
            "total_iterations": result.total_iterations,
            "approved": result.approved,
            "stop_reason": result.stop_reason,
            "iterations": [
                {
                    "iteration": r.iteration,
                    "enhanced_prompt": r.enhanced_prompt,
                    "scores": _scores(r.scores, r.overall),
                    "critique": r.critique,
                    "improvements": r.improvements,
                    "error": r.error,
                    "timestamp": r.timestamp,
                }
                for r in result.iterations
            ],
        }
        self._write(scene_number, "prompt_trace_summary.json", json.dumps(summary, indent=2, ensure_ascii=False))

    def image(self, scene_number: int, variation: int, data: bytes) -> None:
        (self.scene_dir(scene_number) / f"image_{variation}.png").write_bytes(data)

    def quality_scores(self, scene_number: int, prompt: str, weights: dict, variations: list[VariationResult]) -> None:
        document = {
            "prompt": prompt,
            "weights": weights,
            "variations": [
                {
                    "variation": v.variation,
                    "image": f"image_{v.variation}.png" if v.image_key else None,
                    "scores": {name: s.model_dump() for name, s in v.scores.items()},
                    "overall": v.overall,
                    "rank": v.rank,
                    "error": v.error,
                    "provider_metadata": v.provider_metadata,
                }
                for v in variations
            ],
        }
        self._write(scene_number, "quality_scores.json", json.dumps(document, indent=2, ensure_ascii=False))

    def selected(self, scene: SceneResult, threshold: float) -> None:
        if scene.user_provided:
            text = "selected: user-provided reference image (used unchanged, not generated or scored)\n"
        else:
            ranked = sorted((v for v in scene.variations if v.rank), key=lambda v: v.rank)
            lines = [
                f"selected: image_{scene.selected_variation}.png",
                f"overall quality score: {scene.quality_score:.2f} (threshold {threshold:g})",
            ]
            if scene.below_threshold:
                lines.append("WARNING: best score is below the quality threshold; generation continued")
            lines.append("ranking (overall = weighted pickscore, clipscore, vqascore, aesthetic):")
            for v in ranked:
                parts = ", ".join(f"{name} {s.score:.2f}" for name, s in v.scores.items())
                lines.append(f"  {v.rank}. image_{v.variation}.png  {v.overall:.2f}  ({parts})")
            for v in scene.variations:
                if v.error:
                    lines.append(f"  image_{v.variation}: failed: {v.error}")
            text = "\n".join(lines) + "\n"
        self._write(scene.scene_number, "selected_best.txt", text)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _scores(scores, overall) -> dict | None:
    if scores is None:
        return None
    return {**scores.model_dump(), "overall": overall}


def _agent1_text(record: IterationRecord) -> str:
    return f"Cinematographer - iteration {record.iteration}\n\n{record.enhanced_prompt}\n"


def _agent2_text(record: IterationRecord) -> str:
    lines = [f"Prompt Engineer - iteration {record.iteration}", ""]
    if record.error:
        lines.append(f"ERROR: {record.error}")
    if record.scores is not None:
        lines.append("Scores:")
        lines.extend(f"  {name}: {value:g}" for name, value in record.scores.model_dump().items())
        lines.append(f"  overall (weighted): {record.overall:g}")
        lines += ["", "Critique:", record.critique or "", "", "Improvements:"]
        lines.extend(f"  - {item}" for item in record.improvements)
    return "\n".join(lines) + "\n"
