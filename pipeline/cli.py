"""`sceneref` command line: run a generation in this process (claimed with a lease, like a
service replica would), resume a stored one, mint development tokens."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import uuid
from pathlib import Path

import yaml
from pydantic import ValidationError

from pipeline.jobs.store import JobStore
from pipeline.storage.objectstore import LocalObjectStore
from pipeline.storage.factory import open_store
from pipeline.live import make_display
from pipeline.runner import Services
from pipeline.schemas import GenerationRequest
from pipeline.ranking import LocalConsistency, LocalScoring
from scorers.images import USER_UPLOAD, to_png
from pipeline.jobs.worker import JobSettings, JobWorker
from pipeline.settings import CONSISTENCY, SCORER_NAMES, PipelineSettings
from pipeline.jobs.status import to_status
from pipeline.tokens import mint_token

MODELS_DIR_ENV = "SCENEREF_MODELS_DIR"
LOCAL_OWNER = "local"
# The CLI's lease: renewed every LEASE_S / 3 while it runs; after a crash (kill -9, power loss)
# a service or another CLI sharing the database takes the job over this long after.
LEASE_S = 30.0


def cli_holder() -> str:
    return f"cli-{socket.gethostname()}-{os.getpid()}"


def offline_models_dir() -> Path:
    return Path(os.environ.get(MODELS_DIR_ENV, Path.home() / ".cache" / "sceneref" / "offline-models"))


def load_settings(config: Path | None, *, offline: bool, output: Path) -> PipelineSettings:
    if config is not None:
        settings = PipelineSettings.model_validate(yaml.safe_load(config.read_text()) or {})
        if offline:  # --offline wins over the file's providers
            offline_defaults = PipelineSettings.offline(output)
            settings = settings.model_copy(update={"llm": offline_defaults.llm, "images": offline_defaults.images})
    elif offline:
        settings = PipelineSettings.offline(output)
    else:
        settings = PipelineSettings(
            traces=PipelineSettings().traces.model_copy(update={"root": output / "reference_image_traces"}),
            artifacts_dir=output / "artifacts",
        )
    return settings


def local_scoring(settings: PipelineSettings, *, offline: bool) -> LocalScoring:
    """Load the four scorers in this process. Offline, tiny random-weight models are built on
    first use and loaded through the same code path as real model ids."""
    import scorers
    from scorers.tiny import build_tiny_models

    weights = settings.scoring.weights.as_dict()
    if offline:
        options = build_tiny_models(offline_models_dir())
        models = {name: scorers.load_scorer(name, **options[name]) for name in SCORER_NAMES if weights[name] > 0}
    else:
        models = {
            name: scorers.load_scorer(name, **settings.scoring.options_for(name))
            for name in SCORER_NAMES
            if weights[name] > 0
        }
    return LocalScoring(models, weights, input_path=settings.scoring.input_path)


def local_consistency(settings: PipelineSettings, *, offline: bool) -> LocalConsistency:
    """The image-image consistency model, loaded in this process like the four."""
    import scorers
    from scorers.tiny import build_tiny_models

    options = build_tiny_models(offline_models_dir())[CONSISTENCY] if offline else settings.scoring.options_for(CONSISTENCY)
    return LocalConsistency(scorers.load_scorer(CONSISTENCY, **options), input_path=settings.scoring.input_path)


async def _generate(args: argparse.Namespace) -> int:
    output = Path(args.output)
    try:
        request = GenerationRequest(
            prompt=args.prompt,
            target_duration=args.duration,
            advanced_image_num_variations=args.variations,
            advanced_image_max_enhancement_iterations=args.iterations,
            advanced_image_quality_threshold=args.threshold,
        )
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"])
            print(f"error: {field}: {error['msg']}", file=sys.stderr)
        return 2
    reference = None
    if args.image:
        try:
            # The same intake and limits as an HTTP upload's defaults: checked from the header,
            # a longer side than USER_UPLOAD.max_side downscaled.
            reference = to_png(Path(args.image).read_bytes(), USER_UPLOAD)
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            print(f"error: --image {args.image}: {exc}", file=sys.stderr)
            return 2
    settings = _settings(args, offline=args.offline, output=output)
    if settings is None:
        return 2
    services = _services(settings, offline=args.offline, announce=not args.json)
    if services is None:
        return 2
    store = JobStore(args.database or f"sqlite:///{output / 'sceneref.db'}")
    generation_id = uuid.uuid4().hex
    reference_key = None
    if reference is not None:  # persisted before the job exists: a resumed job finds it anywhere
        reference_key = services.artifacts.put(f"{generation_id}/scene_1/user_reference.png", reference, "image/png")
    store.create(
        generation_id, LOCAL_OWNER, request.model_dump(mode="json"), offline=args.offline, reference_key=reference_key
    )
    return await _run(store, generation_id, LOCAL_OWNER, services, settings, args)


async def _resume(args: argparse.Namespace) -> int:
    """Run a stored job again from its next scene: a failed or cancelled job is requeued first;
    an unfinished one is claimed if nobody holds a live lease on it."""
    output = Path(args.output)
    store = JobStore(args.database or f"sqlite:///{output / 'sceneref.db'}")
    record = store.get(args.generation_id)
    if record is None:
        print(f"error: no generation {args.generation_id} in {store.url}", file=sys.stderr)
        return 2
    settings = _settings(args, offline=record.offline, output=output)
    if settings is None:
        return 2
    if record.status == "completed":
        _report(store, record.generation_id, settings, args)
        return 0
    services = _services(settings, offline=record.offline, announce=not args.json)
    if services is None:
        return 2
    if record.status in ("failed", "cancelled"):
        store.requeue(record.generation_id, record.owner)
    return await _run(store, record.generation_id, record.owner, services, settings, args)


def _settings(args: argparse.Namespace, *, offline: bool, output: Path) -> PipelineSettings | None:
    try:
        settings = load_settings(args.config, offline=offline, output=output)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        print(f"error: --config {args.config}: {exc}", file=sys.stderr)
        return None
    if args.keep_traces:
        settings.traces.keep = True
    return settings


def _services(settings: PipelineSettings, *, offline: bool, announce: bool = True) -> Services | None:
    from pipeline.providers.factory import build_providers

    try:
        chat, images = build_providers(settings)
        if announce:
            print("loading scorers ...", file=sys.stderr, flush=True)
        scoring = local_scoring(settings, offline=offline)
        consistency = local_consistency(settings, offline=offline)
    except RuntimeError as exc:  # ProviderError (no API key), ModelNotFoundError (no weights)
        print(f"error: {exc}", file=sys.stderr)
        return None
    return Services(
        chat=chat,
        images=images,
        scoring=scoring,
        consistency=consistency,
        artifacts=open_store(settings.artifacts_dir, settings.s3),
        traces=open_store(settings.traces.root, settings.s3),
    )


async def _run(store: JobStore, generation_id: str, owner: str, services: Services, settings, args) -> int:
    """Claim the job and run it here, with the job worker a service replica runs (for this one
    job: no claim loop). Ctrl-C asks for cancellation and stops the run: the job ends
    `cancelled` (exit 130), never `running` with nobody behind it."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def interrupt() -> None:
        print("cancelling ...", file=sys.stderr, flush=True)
        try:
            store.request_cancel(generation_id, owner)
        except Exception as exc:  # still stop: the job is then released, resumable
            print(f"warning: could not record the cancellation: {exc}", file=sys.stderr)
        task.cancel()

    interrupted = False
    loop.add_signal_handler(signal.SIGINT, interrupt)  # before the claim: no window without it
    worker = JobWorker(store, services, settings, JobSettings(lease_s=LEASE_S), holder=cli_holder())
    lease = worker.claim(generation_id)
    if lease is None:
        loop.remove_signal_handler(signal.SIGINT)
        record = store.get(generation_id)
        print(
            f"error: generation {generation_id} is {record.status}"
            + (f", held by {record.lease_holder} until {record.lease_expires_at:%H:%M:%S} UTC" if record.lease_holder else ""),
            file=sys.stderr,
        )
        return 1
    # Live per-scene board on a terminal, plain lines elsewhere, nothing with --json / --quiet.
    display = make_display(sys.stderr, silent=args.quiet or args.json)
    try:
        await worker.run(lease, on_event=display)
    except asyncio.CancelledError:
        interrupted = True
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if display is not None:
            display.close()
    status = _report(store, generation_id, settings, args)
    if interrupted:
        return 130
    return 0 if status.status == "completed" else 1


def _report(store: JobStore, generation_id: str, settings: PipelineSettings, args: argparse.Namespace):
    artifacts = open_store(settings.artifacts_dir, settings.s3)

    def url_for(key: str) -> str:
        if isinstance(artifacts, LocalObjectStore):
            return artifacts.path(key).resolve().as_uri()
        return f"{str(settings.artifacts_dir).rstrip('/')}/{key}"

    status = to_status(store.get(generation_id), store.scenes(generation_id), url_for)
    if args.json:
        print(status.model_dump_json(indent=2))
    else:
        _print_summary(status, settings)
    return status


def _print_summary(status, settings: PipelineSettings) -> None:
    print(f"generation {status.generation_id}: {status.status}" + (" (OFFLINE demo providers)" if status.offline else ""))
    if status.error:
        print(f"error: {status.error}")
    if status.status in ("failed", "cancelled"):
        print(f"resume with: sceneref resume {status.generation_id}")
    for scene in status.storyboard_plan.scenes:
        score = scene.get("quality_score")
        shown = "user image" if scene.get("user_provided") else (f"{score:.1f}" if score is not None else "-")
        print(f"  scene {scene['scene_number']} ({scene['duration']} s): {shown}  {scene.get('reference_image_url', '')}")
    if settings.traces.keep:
        print(f"traces: {str(settings.traces.root).rstrip('/')}/{status.generation_id}")


def _token(args: argparse.Namespace) -> int:
    secret = os.environ.get(args.secret_env)
    if not secret:
        print(f"error: set {args.secret_env} to the service's HS256 secret (32+ bytes)", file=sys.stderr)
        return 2
    print(mint_token(secret, args.sub, ttl_s=args.ttl, audience=args.audience, issuer=args.issuer))
    return 0


def _offline_models(args: argparse.Namespace) -> int:
    from scorers.tiny import build_tiny_models

    root = Path(args.dir) if args.dir else offline_models_dir()
    options = build_tiny_models(root)
    print(json.dumps({"dir": str(root.resolve()), "scorers": options}, indent=2, default=str))
    return 0


def scoring_from_config(config: Path | None) -> list:
    """The ScoringSettings of a Serve config (each application's args.pipeline.scoring) or of a
    PipelineSettings YAML (its scoring); the defaults without a file."""
    from pipeline.settings import ScoringSettings

    if config is None:
        return [ScoringSettings()]
    document = yaml.safe_load(config.read_text()) or {}
    if "applications" in document:
        return [
            ScoringSettings.model_validate(((app.get("args") or {}).get("pipeline") or {}).get("scoring") or {})
            for app in document["applications"] or []
        ]
    return [ScoringSettings.model_validate(document.get("scoring") or {})]


def _models_fetch(args: argparse.Namespace) -> int:
    """Fetch the configured scorers' weights into the Hugging Face cache (docs/models.md)."""
    from scorers import fetch
    from scorers.hub import offline

    if offline():
        print("error: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: unset it for the fetch "
              "(replicas keep it set, and load from the cache)", file=sys.stderr)
        return 2
    try:
        scorings = scoring_from_config(args.config)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        print(f"error: --config {args.config}: {exc}", file=sys.stderr)
        return 2
    chosen = [  # scorer options are the fields holding device/dtype/allow_random_weights
        (name, value.model_dump())
        for scoring in scorings
        for name, value in scoring
        if hasattr(value, "allow_random_weights") and (not args.scorer or name in args.scorer)
    ]
    unknown = sorted(set(args.scorer or ()) - {name for name, _ in chosen})
    if unknown:
        print(f"error: --scorer {', '.join(unknown)}: not a scorer of the config", file=sys.stderr)
        return 2
    try:
        work = fetch.plan(chosen)
    except fetch.FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    urls = {("aesthetic", "head"): args.aesthetic_head_url} if args.aesthetic_head_url else {}
    return fetch.fetch_all(
        work,
        cache_dir=str(args.cache_dir or fetch.hub_cache_dir()),
        endpoint=args.endpoint or os.environ.get("HF_ENDPOINT") or None,
        token=os.environ.get("HF_TOKEN") or None,
        dry_run=args.dry_run,
        file_urls=urls,
        out=lambda line: print(line, flush=True),
        err=lambda line: print(line, file=sys.stderr, flush=True),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sceneref", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="run one generation in this process")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--duration", type=int, default=15, help="target video duration in seconds (9-60)")
    gen.add_argument("--variations", type=int, default=4, help="image variations per scene (2-8)")
    gen.add_argument("--iterations", type=int, default=4, help="max prompt enhancement iterations (1-6)")
    gen.add_argument("--threshold", type=float, default=30.0, help="quality warning threshold (0-100)")
    gen.add_argument("--image", help="your reference image: used unchanged as scene 1")
    gen.add_argument("--output", default="output", help="directory for artifacts, traces and the job database")
    gen.add_argument("--config", type=Path, help="YAML file of PipelineSettings (providers, models, weights)")
    gen.add_argument("--database", help="job store URL (default: sqlite in --output)")
    gen.add_argument("--offline", action="store_true", help="offline demo providers and tiny local scorer models")
    gen.add_argument("--keep-traces", action="store_true", help="keep trace files after completion")
    gen.add_argument("--json", action="store_true", help="print only the result, as the status JSON (no progress)")
    gen.add_argument("--quiet", action="store_true", help="no progress on stderr (a live board on a terminal, "
                     "else one line per event)")

    res = commands.add_parser(
        "resume",
        help="resume a stored generation at its next scene (a failed, cancelled or abandoned one)",
        description="Resume a generation from the job store: a failed (e.g. a transient provider "
        "error) or cancelled job is requeued, then claimed and run here from its next scene; its "
        "checkpointed scenes are kept. The providers come from --config, or the offline pair if "
        "the job was an offline one.",
    )
    res.add_argument("generation_id")
    res.add_argument("--output", default="output", help="directory for artifacts, traces and the job database")
    res.add_argument("--config", type=Path, help="YAML file of PipelineSettings (providers, models, weights)")
    res.add_argument("--database", help="job store URL (default: sqlite in --output)")
    res.add_argument("--keep-traces", action="store_true", help="keep trace files after completion")
    res.add_argument("--json", action="store_true", help="print only the result, as the status JSON (no progress)")
    res.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    tok = commands.add_parser("token", help="mint a development JWT (HS256) from the configured secret")
    tok.add_argument("--sub", required=True, help="the user (token subject)")
    tok.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    tok.add_argument("--audience")
    tok.add_argument("--issuer")
    tok.add_argument("--secret-env", default="SCENEREF_JWT_SECRET")

    models = commands.add_parser(
        "offline-models", help="build the tiny random-weight scorer models of the offline demo (once)"
    )
    models.add_argument("--dir", help=f"where to build them (default ${MODELS_DIR_ENV} or ~/.cache/sceneref/offline-models)")

    hub = commands.add_parser("models", help="manage the scorers' real model weights")
    hub_commands = hub.add_subparsers(dest="models_command", required=True)
    fetch = hub_commands.add_parser(
        "fetch",
        help="download the configured scorers' weights into the Hugging Face cache ahead of time",
        description="Download exactly the files the scorers load (weights, configs, tokenizer and processor "
        "files) into the Hugging Face cache, so replicas start with HF_HUB_OFFLINE=1 and never download. "
        "Idempotent: cached files are not fetched again. The hub is huggingface_hub's HF_ENDPOINT (or "
        "--endpoint), gated or private repos need HF_TOKEN. See docs/models.md.",
    )
    fetch.add_argument("--config", type=Path, help="a Serve config (applications[].args.pipeline.scoring) or a "
                       "PipelineSettings YAML; default: the built-in scorer defaults")
    fetch.add_argument("--scorer", action="append", help="only this scorer (repeatable)")
    fetch.add_argument("--cache-dir", type=Path, help="the hub cache (default $HF_HUB_CACHE or $HF_HOME/hub): "
                       "replicas must read the same one")
    fetch.add_argument("--endpoint", help="the hub or a mirror (default $HF_ENDPOINT or huggingface.co)")
    fetch.add_argument("--aesthetic-head-url", help="download the aesthetic head file from this URL when it is "
                       "missing at the configured path")
    fetch.add_argument("--dry-run", action="store_true", help="list the files and sizes, download nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "generate":
        return asyncio.run(_generate(args))
    if args.command == "resume":
        return asyncio.run(_resume(args))
    if args.command == "offline-models":
        return _offline_models(args)
    if args.command == "models":
        return _models_fetch(args)
    return _token(args)


if __name__ == "__main__":
    sys.exit(main())
