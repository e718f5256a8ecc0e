"""Several text-image scorers on one device, fed from one decode of each image.

The co-located scoring layout (docs/serving.md) holds all four quality models in one process:
each image arrives once, is decoded once, and every model scores it. Beside the four separate
scorer deployments this saves three transfers and three decodes per image, and lets one
process own the device (or, on a CPU, all its cores) instead of four processes competing.

Each model keeps its own batch limit (`max_batch`): a batch that suits one model's memory or
speed need not suit another's (on a CPU a VQAScore batch of 16 costs more per image than a
batch of 1; on a GPU the large models want smaller batches than CLIP ViT-B-32).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from .base import ScoreOutput, Scorer


class Ensemble:
    """Named scorers scoring the same inputs. Not thread-safe: one `score` at a time (the
    Serve replica runs one pass at a time)."""

    def __init__(self, models: dict[str, Scorer], max_batch: dict[str, int] | None = None,
                 on_batch: Callable[[str, int, float], None] | None = None):
        if not models:
            raise ValueError("an ensemble needs at least one scorer")
        self.models = dict(models)
        self.on_batch = on_batch  # (scorer, batch size, seconds) of each forward pass
        self.set_max_batch(max_batch or {})

    def set_max_batch(self, max_batch: dict[str, int]) -> None:
        """Per model, the most images one forward pass takes (unnamed models: no limit)."""
        unknown = sorted(set(max_batch) - set(self.models))
        if unknown:
            raise ValueError(f"batch limits for scorers that are not loaded: {', '.join(unknown)} "
                             f"(loaded: {', '.join(self.models)})")
        if any(int(limit) < 1 for limit in max_batch.values()):
            raise ValueError("a per-model batch limit is at least 1")
        self.max_batch = {name: int(max_batch.get(name, 0)) for name in self.models}  # 0: no limit

    def score(self, images: Sequence, prompts: Sequence[str], record: bool = True) -> list[dict[str, ScoreOutput]]:
        """Every model over every image (PIL images or uint8 tensors, as `Scorer.score` takes),
        in pieces of at most each model's batch limit; per image, its outputs keyed by name.
        `record=False` keeps the pass out of `on_batch` (a health probe is not traffic)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
        results: list[dict[str, ScoreOutput]] = [{} for _ in images]
        for name, model in self.models.items():
            step = self.max_batch[name] or len(images) or 1
            for start in range(0, len(images), step):
                piece = slice(start, start + step)
                started = time.perf_counter()
                outputs = model.score(list(images[piece]), list(prompts[piece]))
                if record and self.on_batch is not None:
                    self.on_batch(name, len(outputs), time.perf_counter() - started)
                for slot, output in zip(results[piece], outputs):
                    slot[name] = output
        return results


class EmbeddingCache:
    """Image-image similarity with each image embedded once per replica, however often it is
    compared (`scorers.consistency.Consistency`'s `embed`, keyed by the caller's content key).

    A scene's selected image is the reference of every variation of the scenes after it, and
    scene 1's of all of them: without the cache each pair embeds both images again, twice the
    work of embedding each new image once. The most recent `max_items` embeddings are kept
    (a few KB each); an image whose embedding is kept is not even decoded again.
    """

    def __init__(self, model, max_items: int = 1024):
        from collections import OrderedDict

        self.model, self.max_items = model, max_items
        self.kept: "OrderedDict[object, object]" = OrderedDict()
        self.embedded = 0  # images embedded, for tests and the benchmarks

    def similarity(self, pairs: Sequence[tuple[object, object, object, object]],
                   decode: Callable[[object], object] = lambda data: data) -> list[ScoreOutput]:
        """pairs: (key, image, reference key, reference); images and references are what
        `decode` turns into the model's input (bytes through the image intake, or images
        already). Per pair the model's raw cosine and its 0-100 score."""
        from .consistency import normalise

        missing: dict[object, object] = {}
        for key, image, reference_key, reference in pairs:
            for k, data in ((key, image), (reference_key, reference)):
                if k not in self.kept and k not in missing:
                    missing[k] = data
        if missing:
            inputs = [decode(data) for data in missing.values()]
            with torch.inference_mode():
                embeddings = self.model.embed(inputs).float().cpu()
            self.embedded += len(inputs)
            for k, row in zip(missing, embeddings):
                self.kept[k] = row
        outputs = []
        for key, _, reference_key, _ in pairs:
            self.kept.move_to_end(key)
            self.kept.move_to_end(reference_key)
            cos = float((self.kept[key] * self.kept[reference_key]).sum())
            outputs.append(ScoreOutput(raw=cos, score=normalise(cos), truncated=False))
        while len(self.kept) > self.max_items:
            self.kept.popitem(last=False)
        return outputs
