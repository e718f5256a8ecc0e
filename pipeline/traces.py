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
import re
from pathlib import Path

from pipeline.agents import failed_agent
from pipeline.storage.objectstore import ArtifactNotFound, LocalObjectStore, ObjectStore, check_key, share
from pipeline.storage.factory import as_store, open_store
from pipeline.schemas import EnhancementResult, IterationRecord, ScenePlan, SceneResult, VariationResult

# An image that lives in the artifact store is named in an S3 trace tree by a small pointer
# object `image_{k}.png.link` instead of a second copy; the read API below shows it as
# `image_{k}.png` with the artifact's bytes. Local trace trees use hard links instead, so the
# files on disk keep exactly the guide's names.
LINK_SUFFIX = ".link"
# The agents' files of one scene (`01_agent1_iteration_1.txt`, `02_agent2_iteration_1.txt`, ...).
_AGENT_FILE = re.compile(r"\d{2,}_agent[12]_iteration_\d+\.txt")


class TraceStore:
    """Reads the trace trees of any generation, on either backend: the ingress's trace routes
    use this, so they work the same whether traces are files or objects."""

    def __init__(self, store_or_root: ObjectStore | str | Path, artifacts: ObjectStore | None = None, s3=None):
        self.store = as_store(store_or_root, s3)
        self.artifacts = artifacts
        self._s3 = s3

    def list_files(self, generation_id: str) -> list[str]:
        """The generation's trace files relative to its folder (`scene_1/00_original_prompt.txt`),
        sorted; [] when there are none (never written, or cleaned up)."""
        base = check_key(generation_id) + "/"
        names = {key[len(base):] for key in self.store.list(generation_id)}
        return sorted({name.removesuffix(LINK_SUFFIX) for name in names})

    def read_file(self, generation_id: str, name: str) -> bytes:
        """One trace file's bytes. ValueError for a bad name (`..`, absolute), ArtifactNotFound
        when missing."""
        if name.endswith(LINK_SUFFIX):
            raise ArtifactNotFound(name)
        key = f"{check_key(generation_id)}/{check_key(name)}"
        try:
            return self.store.get(key)
        except ArtifactNotFound:
            pointer = json.loads(self.store.get(key + LINK_SUFFIX))
        return self._artifacts_for(pointer["store"]).get(pointer["key"])

    def _artifacts_for(self, url: str) -> ObjectStore:
        if self.artifacts is not None and self.artifacts.url == url:
            return self.artifacts
        # Not handed the artifact store: open it from the pointer, with the S3 settings given,
        # else those of the trace store itself (artifacts and traces share one S3 service).
        return open_store(url, self._s3 or getattr(self.store, "settings", None))

    def delete(self, generation_id: str) -> int:
        """Remove one generation's trace tree (pointers only: the artifacts stay)."""
        return self.store.delete_prefix(check_key(generation_id))

    files = list_files
    read = read_file


class TraceWriter(TraceStore):
    """Writes one generation's trace tree. Methods are synchronous and cheap (one small write
    each); on S3 each is one PUT, so a caller on an event loop may move them to a thread."""

    def __init__(
        self,
        store_or_root: ObjectStore | str | Path,
        generation_id: str,
        *,
        artifacts: ObjectStore | None = None,
        s3=None,
        folder: str | None = None,
    ):
        """`folder` puts every scene's files one level down, `scene_{n}/{folder}/`: the runner
        keeps a failed attempt's unfinished scenes there, apart from the guide's names, which
        only a run whose checkpoint was accepted writes (fencing, docs/serving.md)."""
        super().__init__(store_or_root, artifacts, s3)
        self.generation_id = check_key(generation_id)
        self.folder = check_key(folder) if folder is not None else None

    def scene_prefix(self, scene_number: int) -> str:
        base = f"{self.generation_id}/scene_{scene_number}"
        return f"{base}/{self.folder}" if self.folder else base

    def key(self, scene_number: int, name: str) -> str:
        return f"{self.scene_prefix(scene_number)}/{name}"

    def _write(self, scene_number: int, name: str, text: str) -> None:
        kind = "application/json" if name.endswith(".json") else "text/plain; charset=utf-8"
        self.store.put(self.key(scene_number, name), text.encode("utf-8"), kind)

    # The read API, bound to this generation: list_files() / read_file(name); the TraceStore
    # forms with an explicit generation id keep working too.
    def list_files(self, generation_id: str | None = None) -> list[str]:
        return super().list_files(generation_id or self.generation_id)

    def read_file(self, generation_id: str, name: str | None = None) -> bytes:
        """read_file(name) for this generation, or read_file(generation_id, name)."""
        if name is None:
            generation_id, name = self.generation_id, generation_id
        return super().read_file(generation_id, name)

    files = list_files
    read = read_file

    def original_prompt(self, scene_number: int, prompt: str) -> None:
        self._write(scene_number, "00_original_prompt.txt", prompt + "\n")

    def enhancement(
        self, scene_number: int, result: EnhancementResult, *, scene: ScenePlan | None = None, extra: dict | None = None
    ) -> None:
        """The scene's agent files, summary and final prompt, written as one set: the scene's
        agent files of an earlier run (a resumed job enhancing the scene again, perhaps in fewer
        iterations) are removed first, so no file of a higher iteration stays behind as if this
        run had written it. An iteration where agent 1 failed is a failure in agent 1's file and
        has no agent-2 file (agent 2 never ran); one where agent 2 failed has agent 1's prompt in
        its file and the error in agent 2's."""
        self._remove_agent_files(scene_number)
        for record in result.iterations:
            i = record.iteration
            failed = failed_agent(record)
            self._write(scene_number, f"{2 * i - 1:02d}_agent1_iteration_{i}.txt", _agent1_text(record))
            if failed != "cinematographer" and (record.scores is not None or record.error):
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
            **_consistency(scene),
            "iterations": [
                {
                    "iteration": r.iteration,
                    "enhanced_prompt": r.enhanced_prompt or None,  # None: agent 1 wrote none
                    "scores": _scores(r.scores, r.overall),
                    "critique": r.critique,
                    "improvements": r.improvements,
                    "error": r.error,
                    "failed_agent": failed_agent(r),
                    "dropped_markers": r.dropped_markers,
                    "timestamp": r.timestamp,
                }
                for r in result.iterations
            ],
            **(extra or {}),  # additive keys (the agents' cost and time)
        }
        self._write(scene_number, "prompt_trace_summary.json", json.dumps(summary, indent=2, ensure_ascii=False))

    def user_scene_summary(self, scene: ScenePlan) -> None:
        """The summary of the user's scene 1: nothing was enhanced, but the consistency sheet
        (written from the user's image where the model could see it) belongs in every scene."""
        summary = {
            "original_prompt": scene.prompt,
            "final_prompt": None,
            "user_provided": True,
            "total_iterations": 0,
            **_consistency(scene),
            "iterations": [],
        }
        self._write(scene.scene_number, "prompt_trace_summary.json", json.dumps(summary, indent=2, ensure_ascii=False))

    def _remove_agent_files(self, scene_number: int) -> None:
        prefix = self.scene_prefix(scene_number)
        for key in self.store.list(prefix):
            if _AGENT_FILE.fullmatch(key[len(prefix) + 1 :]):
                self.store.delete_prefix(key)  # a whole key: exactly that object, on both backends

    def image(
        self, scene_number: int, variation: int, data: bytes, *, artifact_key: str | None = None, artifacts=None
    ) -> str:
        """`image_{k}.png`, stored once: when the same bytes are already the artifact
        `artifact_key`, a local trace tree gets a hard link to it (a copy only across
        filesystems) and an S3 trace tree a pointer to it (a server-side copy would still be a
        second copy). Returns how it was stored: "link", "pointer" or "copy"."""
        artifacts = artifacts if artifacts is not None else self.artifacts
        key = self.key(scene_number, f"image_{variation}.png")
        if artifact_key is not None and artifacts is not None:
            if share(artifacts, artifact_key, self.store, key):
                return "link"
            if not isinstance(self.store, LocalObjectStore) and not isinstance(artifacts, LocalObjectStore):
                pointer = {"store": artifacts.url, "key": artifact_key, "bytes": len(data)}
                self.store.put(key + LINK_SUFFIX, json.dumps(pointer).encode(), "application/json")
                return "pointer"
        self.store.put(key, data, "image/png")
        return "copy"

    def quality_scores(
        self, scene_number: int, prompt: str, weights: dict, variations: list[VariationResult], *, scoring: dict | None = None,
        extra: dict | None = None,
    ) -> None:
        document = {
            "prompt": prompt,
            "weights": weights,
            **({"scoring": scoring} if scoring is not None else {}),
            "variations": [
                {
                    "variation": v.variation,
                    "image": f"image_{v.variation}.png" if v.image_key else None,
                    "scores": {name: s.model_dump() for name, s in v.scores.items()},
                    "consistency": v.consistency.model_dump() if v.consistency is not None else None,
                    "overall": v.overall,
                    "rank": v.rank,
                    "error": v.error,
                    "provider_metadata": v.provider_metadata,
                }
                for v in variations
            ],
            **(extra or {}),  # additive keys (the scene's cost and time)
        }
        self._write(scene_number, "quality_scores.json", json.dumps(document, indent=2, ensure_ascii=False))

    def selected(self, scene: SceneResult, threshold: float, *, formula: str | None = None) -> None:
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
            if scene.consistency_score is not None:
                lines.append(f"consistency with earlier scenes: {scene.consistency_score:.2f}")
            how = f"overall = {formula}" if formula else "overall = weighted pickscore, clipscore, vqascore, aesthetic"
            lines.append(f"ranking ({how}):")
            for v in ranked:
                parts = ", ".join(f"{name} {s.score:.2f}" for name, s in v.scores.items())
                if v.consistency is not None:
                    parts += f", consistency {v.consistency.score:.2f}"
                lines.append(f"  {v.rank}. image_{v.variation}.png  {v.overall:.2f}  ({parts})")
            for v in scene.variations:
                if v.error:
                    lines.append(f"  image_{v.variation}: failed: {v.error}")
            text = "\n".join(lines) + "\n"
        self._write(scene.scene_number, "selected_best.txt", text)

    def cleanup(self) -> int:
        """Remove this generation's trace tree on either backend; returns the objects removed."""
        return self.delete(self.generation_id)


def _consistency(scene: ScenePlan | None) -> dict:
    """The scene's consistency sheet and markers for its summary."""
    if scene is None:
        return {}
    return {
        "scene_description": scene.description,
        "consistency_markers": scene.markers,
        "consistency_sheet": scene.sheet.model_dump() if scene.sheet is not None else None,
    }


def _scores(scores, overall) -> dict | None:
    if scores is None:
        return None
    return {**scores.model_dump(), "overall": overall}


def _agent1_text(record: IterationRecord) -> str:
    if record.dropped_markers:
        dropped = "\n".join(f"  - {marker}" for marker in record.dropped_markers)
        return (
            f"Cinematographer - iteration {record.iteration}\n\n{record.enhanced_prompt}\n\n"
            f"REFUSED: the rewrite dropped consistency markers, which every prompt must carry verbatim:\n"
            f"{dropped}\n\nThe Prompt Engineer did not review it; agent 1 is asked to restore them.\n"
        )
    if failed_agent(record) == "cinematographer":
        return (
            f"Cinematographer - iteration {record.iteration}\n\n"
            f"FAILED: {record.error}\n\n"
            "No prompt was written in this iteration and the Prompt Engineer did not run. The final\n"
            "prompt comes from the earlier iterations, or is the original prompt when there were\n"
            "none (see final_enhanced_prompt.txt and prompt_trace_summary.json).\n"
        )
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
