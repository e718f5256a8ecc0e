"""Consistency evaluation: does carrying consistency markers, or giving consistency a
weight in selection, make the scenes of a story look more alike?

Runs each story (several multi-scene stories built in, or --stories FILE with one prompt a
line) through the real runner in four arms: markers on/off x consistency weight 0 / 0.2
(--weight). Every arm measures the consistency score (scorers/consistency.py: DINOv2 CLS cosine
of a scene's selected image with the previous scene's and scene 1's, 0-100) and reports per arm
the mean consistency of the selected images (scenes 2..N), the mean overall score, and how
many scenes selected a different variation than the weight-0 arm.

    .venv/bin/python benchmarks/consistency_eval.py --offline            # plumbing check, no key, CPU
    .venv/bin/python benchmarks/consistency_eval.py --config settings.yaml --stories stories.txt --json out.json

--offline uses the offline providers (procedural images) and the tiny random-weight scorer
models: THE NUMBERS THEN SAY NOTHING ABOUT CONSISTENCY, only that the plumbing works (a random
DINOv2 and procedural images). With --config, the providers and the five scorers come from the
file (PipelineSettings; scoring.consistency.model is the DINOv2 id), so the same script
measures real models on a GPU machine with an API key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.storage.objectstore import LocalObjectStore  # noqa: E402
from pipeline.providers.factory import build_providers  # noqa: E402
from pipeline.runner import Services, run_generation  # noqa: E402
from pipeline.schemas import GenerationRequest  # noqa: E402
from pipeline.ranking import LocalConsistency, LocalScoring  # noqa: E402
from pipeline.settings import CONSISTENCY, SCORER_NAMES, PipelineSettings, TraceSettings  # noqa: E402

STORIES = (
    "A launch video for Aurora, a smart desk lamp that adapts to your circadian rhythm",
    "Artisan coffee that starts your morning right, brewed by a young barista in a small cafe",
    "A grandmother teaches her grandson to bake her famous lemon cake for the family picnic",
    "Trailblazer hiking boots on a three-day mountain trek from forest to summit",
    "A cyclist commutes through the rainy city with the Volt folding e-bike",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--offline", action="store_true", help="offline providers and tiny models (plumbing only)")
    source.add_argument("--config", type=Path, help="PipelineSettings YAML: real providers and models")
    parser.add_argument("--stories", type=Path, help="one story prompt a line (default: five built-in stories)")
    parser.add_argument("--duration", type=int, default=15, help="target_duration (default 15 -> 4 scenes)")
    parser.add_argument("--variations", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--weight", type=float, default=0.2, help="the consistency weight of the weighted arms")
    parser.add_argument("--models-dir", type=Path, help="where --offline builds the tiny models (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the per-arm figures and per-scene rows here")
    return parser.parse_args(argv)


def load_models(settings: PipelineSettings, offline: bool, models_dir: Path | None):
    """The four text-image scorers and the consistency scorer, in this process."""
    import scorers

    if offline:
        from scorers.tiny import build_tiny_models

        options = build_tiny_models(models_dir or Path(tempfile.mkdtemp(prefix="sceneref-eval-models-")))
    else:
        options = {name: settings.scoring.options_for(name) for name in (*SCORER_NAMES, CONSISTENCY)}
    weights = settings.scoring.weights.as_dict()
    text = {name: scorers.load_scorer(name, **options[name]) for name in SCORER_NAMES if weights[name] > 0}
    return LocalScoring(text, weights), LocalConsistency(scorers.load_scorer(CONSISTENCY, **options[CONSISTENCY]))


async def run_arm(story: str, settings: PipelineSettings, scoring, consistency, args, out: Path) -> list:
    chat, images = build_providers(settings)
    services = Services(chat=chat, images=images, scoring=scoring, artifacts=LocalObjectStore(out / "artifacts"),
                        consistency=consistency)
    request = GenerationRequest(
        prompt=story, target_duration=args.duration, advanced_image_num_variations=args.variations,
        advanced_image_max_enhancement_iterations=args.iterations,
    )
    return await run_generation(f"eval-{abs(hash((story, str(out)))) % 10**8}", request, services, settings)


def arm_settings(base: PipelineSettings, out: Path, markers: bool, weight: float) -> PipelineSettings:
    scoring = base.scoring.model_copy(update={"weights": base.scoring.weights.model_copy(update={"consistency": weight})})
    return base.model_copy(update={
        "scoring": scoring,
        "storyboard": base.storyboard.model_copy(update={"markers": markers}),
        "traces": TraceSettings(root=out / "traces", keep=False),
        "artifacts_dir": out / "artifacts",
    })


async def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sceneref-consistency-eval-"))
    if args.offline:
        base = PipelineSettings.offline(work)
    else:
        base = PipelineSettings.model_validate(yaml.safe_load(args.config.read_text()) or {})
    stories = [s.strip() for s in args.stories.read_text().splitlines() if s.strip()] if args.stories else list(STORIES)
    started = time.perf_counter()
    scoring, consistency = load_models(base, args.offline, args.models_dir)
    arms = [(m, w) for m in (True, False) for w in (0.0, args.weight)]
    rows, selections = [], {}
    for index, story in enumerate(stories):
        for markers, weight in arms:
            out = work / f"story{index}-{'markers' if markers else 'plain'}-w{weight:g}"
            scenes = await run_arm(story, arm_settings(base, out, markers, weight), scoring, consistency, args, out)
            selections[(index, markers, weight)] = [s.selected_variation for s in scenes]
            for s in scenes[1:]:
                rows.append({"story": index, "markers": markers, "weight": weight, "scene": s.scene_number,
                             "consistency": s.consistency_score, "overall": s.quality_score,
                             "selected": s.selected_variation})
    summary = []
    for markers, weight in arms:
        mine = [r for r in rows if r["markers"] == markers and r["weight"] == weight]
        changed = sum(
            a != b
            for index in range(len(stories))
            for a, b in zip(selections[(index, markers, weight)], selections[(index, markers, 0.0)])
        )
        summary.append({
            "markers": markers, "weight": weight, "scenes": len(mine),
            "mean_consistency": round(statistics.fmean(r["consistency"] for r in mine), 2),
            "mean_overall": round(statistics.fmean(r["overall"] for r in mine), 2),
            "selections_changed_vs_weight_0": changed,
        })
    result = {
        "offline": args.offline,
        "caveat": "offline providers and random tiny models: the figures only show that the plumbing works"
        if args.offline else "real providers and models from " + str(args.config),
        "stories": len(stories), "duration": args.duration, "variations": args.variations,
        "seconds": round(time.perf_counter() - started, 1), "arms": summary, "rows": rows,
    }
    print(f"{len(stories)} stories x 4 arms, {args.variations} variations, {args.duration} s; {result['caveat']}")
    print("markers  weight  scenes  mean consistency  mean overall  selections changed vs weight 0")
    for arm in summary:
        print(f"{str(arm['markers']):<8} {arm['weight']:<7g} {arm['scenes']:<7} {arm['mean_consistency']:<17} "
              f"{arm['mean_overall']:<13} {arm['selections_changed_vs_weight_0']}")
    print(f"wall time {result['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    asyncio.run(main())
