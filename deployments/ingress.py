"""The HTTP API: the `Ingress` deployment, run as several replicas. Its handlers carry their
routes (`deployments.api.route`); each replica builds its own FastAPI app from them
(`__serve_build_asgi_app__` -> `deployments.api.create_api`).

Nothing that matters lives in a replica: a submission is persisted whole before it is answered
(the request, the owner, the user's image as an artifact), and every replica starts a job worker
(`pipeline.jobs.worker`) that takes unfinished jobs from the shared job store with a lease it
renews while it works; the ingress itself only routes HTTP. A replica that dies simply stops
renewing; another one takes the job over at its next scene. Artifacts and trace files live in
the configured object store (a directory or S3), so any replica on any node serves any
generation.
"""

# No `from __future__ import annotations` here: FastAPI, through @serve.ingress, must see the
# route parameters' real types (a string `Request` becomes a required field).
import asyncio
import functools
import logging
import mimetypes
import os
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import Depends, File, Form, HTTPException, Path, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.adapters import HandleChat, HandleImages, ScorerHandles
from deployments.api import create_api, principal, route
from deployments.args import AppArgs
from deployments.auth import Authenticator, Principal
from deployments.metrics import install as install_metrics, record_final_status
from deployments.contract import (
    AUTHED, JOB_STORE, Accepted, CancelRequested, Health, Ready, Requeued, TraceListing, check_generation_id, check_trace_name, link, responses,
    TRACE_NAME_PATTERN,
)
from deployments.events_api import EventRoutes
from deployments.readiness import ReadinessCheck, StoreCheck, ping_object_store
from deployments.signing import SignatureError, sign_url, verify_signed
from deployments.uploads import UploadError, prepare_upload
from deployments.viewer import ViewerRoutes
from pipeline.storage.objectstore import ArtifactNotFound
from pipeline.storage.factory import open_store
from pipeline.jobs.store import FINISHED, JobStore
from pipeline.jobs.limits import AdmissionRefused, Refusal, check_admission
from pipeline.runner import Services, check_services
from pipeline.schemas import GenerationRequest, GenerationStatus
from pipeline.jobs.status import to_status
from pipeline.jobs.worker import JobWorker
from pipeline.traces import TraceWriter

log = logging.getLogger("sceneref.ingress")


# How long a cancel of a job this replica runs waits for the job's final status before it answers.
CANCEL_ANSWER_WAIT_S = 10.0
STORES_RETRY_AFTER_S = 5  # a submission refused while a store cannot be reached


def request_form(name: str):
    """The multipart form field for GenerationRequest's field `name`: its default and bounds,
    written once in the request model (the JSON route's body)."""
    field = GenerationRequest.model_fields[name]
    bounds = {
        attr: getattr(rule, attr) for rule in field.metadata
        for attr in ("gt", "ge", "lt", "le", "min_length", "max_length") if hasattr(rule, attr)
    }
    default = ... if field.is_required() else field.default
    return Form(default, json_schema_extra=field.json_schema_extra, **bounds)


@serve.deployment(max_ongoing_requests=256)
@serve.ingress()  # the app is built per replica by __serve_build_asgi_app__ (deployments/api.py)
class Ingress(ViewerRoutes, EventRoutes):
    def __init__(
        self,
        *,
        scorers: ScorerHandles,
        generator: DeploymentHandle,
        agents: DeploymentHandle,
        args: AppArgs,
    ):
        install_metrics()  # the runner's stages, costs and selections, and final statuses (metrics)
        self.args = args
        self.settings = args.pipeline
        self.authenticator = Authenticator(args.auth)
        self.url_secret = args.url_secret()
        self.store = JobStore(args.job_store_url())
        self.artifacts = open_store(self.settings.artifacts_dir, self.settings.s3)
        self.trace_store = open_store(self.settings.traces.root, self.settings.s3)
        weights = self.settings.scoring.weights.as_dict()
        active = [name for name, weight in weights.items() if weight > 0]  # the weighed text-image scorers
        # What a generation needs: a submission while one has no live replica answers 503, and a
        # call past its timeout keeps waiting only while its deployment has a live replica.
        needed = [generator, agents, *scorers.needed(active)]
        self.readiness = ReadinessCheck(serve.status, generator.app_name, [h.deployment_name for h in needed])
        # The stores every route depends on, for GET /api/ready and submissions (deployments.readiness).
        probes = {"job store": self.store.ping, "object store": functools.partial(ping_object_store, self.artifacts)}
        if self.trace_store.url != self.artifacts.url:
            probes["trace store"] = functools.partial(ping_object_store, self.trace_store)
        self.store_check = StoreCheck(probes)
        scoring_client, consistency_client = scorers.clients(active, args.handle_retry, self._served)
        self.services = Services(
            chat=HandleChat(agents, args.handle_retry, self._served),
            images=HandleImages(generator, args.handle_retry, self._served),
            scoring=scoring_client,
            consistency=consistency_client,
            artifacts=self.artifacts,
            traces=self.trace_store,
        )
        check_services(self.services, self.settings)  # a config that cannot work fails the replica now
        self.offline = args.offline()  # every status says so, to every user
        self.holder = f"ingress-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # The job worker of this replica: claims jobs and runs them, watches cancel requests and
        # sweeps retention (pipeline.jobs.worker); the ingress only routes HTTP to it.
        self.worker = JobWorker(
            self.store, self.services, self.settings, args.jobs, holder=self.holder, retention=args.retention,
            artifacts=self.artifacts, traces=self.trace_store,
            on_finished=functools.partial(record_final_status, self.store),  # final statuses, counted
        )
        # Request-path reads and writes get threads of their own, so a status or a submission
        # never queues behind the running jobs' trace, artifact and lease work.
        self.api_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sceneref-api")
        self.worker.start()

    async def _served(self, deployment: str) -> bool:
        """Serve's controller reports a live replica of `deployment` (cached; see readiness). When
        the controller cannot be asked, no: the call's own timeout decides, so nothing waits forever."""
        readiness = await self.readiness.check()
        return readiness.checked and deployment not in readiness.missing

    def __serve_build_asgi_app__(self):
        """Serve calls this after the constructor: this replica's own app, with its settings."""
        return create_api(self, authenticator=self.authenticator, upload_limit_bytes=self.args.uploads.max_bytes)

    async def _api(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.api_pool, functools.partial(fn, *args, **kwargs))

    async def __del__(self) -> None:
        """Serve stops this replica: its worker stops claiming and stops the running jobs, which
        release their leases so another replica resumes them at once instead of after the lease."""
        await self.worker.stop()

    # --- routes -----------------------------------------------------------------------

    async def _submit(self, request: GenerationRequest, principal: Principal, http: Request, upload=None) -> dict:
        readiness = await self.readiness.check()
        if not readiness.ready:
            raise HTTPException(503, detail=readiness.reason(), headers={"Retry-After": "15"})
        # The stores must answer (cached probes, as GET /api/ready): a job accepted while the
        # object store is down would only fail at its first image.
        stores = await self.store_check.check()
        if not stores.ok:
            raise HTTPException(503, detail=stores.reason(), headers={"Retry-After": str(STORES_RETRY_AFTER_S)})
        # An early answer, before an upload is stored; the insert below decides, atomically.
        refusal = await self._api(check_admission, self.store, principal.subject, self.args.limits)
        if refusal is not None:
            raise refused(refusal)
        generation_id = uuid.uuid4().hex
        reference_key = None
        if upload is not None:  # persisted before the job exists: whoever runs it finds the image
            reference_key = await self._api(
                self.artifacts.put, f"{generation_id}/scene_1/user_reference.png", upload.png, "image/png"
            )
            if upload.original is not None:
                kind = (upload.original_format or "bin").lower()
                await self._api(self.artifacts.put, f"{generation_id}/upload/original.{kind}", upload.original)
        try:  # the admission check and the insert in one serialised transaction: races cannot pass a limit
            await self._api(
                self.store.create, generation_id, principal.subject, request.model_dump(mode="json"),
                offline=self.offline, reference_key=reference_key, limits=self.args.limits,
            )
        except AdmissionRefused as exc:
            if upload is not None:  # refused after the upload was stored: no job will ever own it
                try:
                    await self._api(self.artifacts.delete_prefix, f"{generation_id}/")
                except Exception:
                    log.exception("could not remove the upload of refused generation %s", generation_id)
            raise refused(exc.refusal) from None
        except Exception:
            if upload is not None:
                await self._forget_upload(generation_id)
            raise
        self.worker.wake()
        return {
            "generation_id": generation_id,
            "status": "queued",
            "status_url": link(self.args.public_base_url, http.scope.get("root_path", ""), f"/api/status/{generation_id}"),
        }

    async def _forget_upload(self, generation_id: str) -> None:
        """Creating the job's row failed after its upload was stored: remove the upload (nothing
        stored may lack a row), unless the row exists after all (a commit whose answer was lost:
        the job needs its image). What cannot be decided now (the database is down), retention's
        orphan sweep decides later, after its grace period."""
        try:
            if await self._api(self.store.get, generation_id) is None:
                await self._api(self.artifacts.delete_prefix, generation_id)
        except Exception as exc:
            log.warning("generation %s: its upload stays for retention to remove (%r)", generation_id, exc)

    @route("GET", "/api/health", response_model=Health)
    async def health(self) -> dict:
        """No I/O: answers at once however busy the replica is."""
        return {"status": "ok", "running_generations": self.worker.running, "offline": self.offline}

    @route("GET", "/api/ready", response_model=Ready, responses=responses(503))
    async def ready(self) -> dict:
        """200 when the job store and the object stores answer and every deployment a generation
        needs has a live replica; else 503 naming what is missing (cached a few seconds)."""
        stores, readiness = await asyncio.gather(self.store_check.check(), self.readiness.check())
        if not stores.ok:
            raise HTTPException(503, detail=stores.reason(), headers={"Retry-After": "5"})
        if not readiness.ready:
            raise HTTPException(503, detail=readiness.reason(), headers={"Retry-After": "15"})
        return {
            "status": "ready" if readiness.checked else "unknown", "deployments": self.readiness.required,
            "stores": list(stores.checked),
        }

    @route("POST", "/api/generate", status_code=202, response_model=Accepted, responses=responses(*AUTHED, 400, 413, 422, 429, 503))
    async def generate(self, body: GenerationRequest, http: Request, principal: Principal = Depends(principal)) -> dict:
        return await self._submit(body, principal, http)

    @route("POST", "/api/generate-with-image", status_code=202, response_model=Accepted, responses=responses(*AUTHED, 400, 413, 415, 422, 429, 503))
    async def generate_with_image(
        self,
        http: Request,
        # Defaults and bounds read from GenerationRequest, so the document declares what is valid.
        prompt: str = request_form("prompt"),
        image: UploadFile = File(..., description="PNG, JPEG or WEBP", json_schema_extra={"minLength": 1}),
        target_duration: int = request_form("target_duration"),
        use_advanced_image_generation: bool = request_form("use_advanced_image_generation"),
        advanced_image_num_variations: int = request_form("advanced_image_num_variations"),
        advanced_image_max_enhancement_iterations: int = request_form("advanced_image_max_enhancement_iterations"),
        advanced_image_quality_threshold: float = request_form("advanced_image_quality_threshold"),
        principal: Principal = Depends(principal),
    ) -> dict:
        try:
            request = GenerationRequest(
                prompt=prompt,
                target_duration=target_duration,
                use_advanced_image_generation=use_advanced_image_generation,
                advanced_image_num_variations=advanced_image_num_variations,
                advanced_image_max_enhancement_iterations=advanced_image_max_enhancement_iterations,
                advanced_image_quality_threshold=advanced_image_quality_threshold,
            )
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        try:
            upload = await prepare_upload(image, self.args.uploads)
        except UploadError as exc:
            if exc.status_code == 422:  # an invalid field like any other: named in the 422's `errors`
                raise RequestValidationError([{"loc": ("body", "image"), "msg": exc.detail, "type": "value_error"}]) from None
            raise HTTPException(exc.status_code, detail=f"image: {exc.detail}") from None
        return await self._submit(request, principal, http, upload)

    def _read_status(self, generation_id: str, owner: str):
        record = self.store.get(generation_id, owner)
        return (record, self.store.scenes(generation_id)) if record is not None else (None, [])

    @route("GET", "/api/status/{generation_id}", name="status", response_model=GenerationStatus, responses=responses(*AUTHED, *JOB_STORE, 404))
    async def status(self, generation_id: str, http: Request, principal: Principal = Depends(principal)) -> dict:
        check_generation_id(generation_id)
        record, scenes = await self._api(self._read_status, generation_id, principal.subject)
        if record is None:  # also for another user's id, so ids cannot be probed
            raise HTTPException(404, detail=f"generation {generation_id} not found")
        root = http.scope.get("root_path", "")

        def url_for(key: str) -> str:
            return link(self.args.public_base_url, root, "") + sign_url(f"/api/artifacts/{key}", self.url_secret, ttl_s=self.args.url_ttl_s)

        return to_status(record, scenes, url_for).model_dump(mode="json")

    @route("DELETE", "/api/generations/{generation_id}", status_code=202, response_model=CancelRequested, responses=responses(*AUTHED, *JOB_STORE, 404, 409))
    async def cancel(self, generation_id: str, principal: Principal = Depends(principal)) -> dict:
        """Ask the job to stop; the answer says what happened (see CancelRequested). A queued
        job ends `cancelled` at once; one this replica runs is stopped now and its final status
        awaited (bounded); one another replica runs stops at that replica's next look at the
        flag. Finished scenes are kept."""
        check_generation_id(generation_id)
        record = await self._api(self.store.get, generation_id, principal.subject)
        if record is None:
            raise HTTPException(404, detail=f"generation {generation_id} not found")
        if record.status in FINISHED:
            raise HTTPException(409, detail=f"generation {generation_id} is already {record.status}")
        await self._api(self.store.request_cancel, generation_id, principal.subject)
        task = self.worker.cancel_local(generation_id)  # running here: stopped now, not at its next look
        if task is not None:
            await asyncio.wait([task], timeout=CANCEL_ANSWER_WAIT_S)  # never cancels the job's task itself
        record = await self._api(self.store.get, generation_id, principal.subject)
        return cancel_answer(generation_id, record.status)

    @route("POST", "/api/generations/{generation_id}/resume", status_code=202, response_model=Requeued, responses=responses(*AUTHED, *JOB_STORE, 404, 409, 429))
    async def resume(self, generation_id: str, principal: Principal = Depends(principal)) -> dict:
        """Run a failed or cancelled generation again from its next unfinished scene."""
        check_generation_id(generation_id)
        record = await self._api(self.store.get, generation_id, principal.subject)
        if record is None:
            raise HTTPException(404, detail=f"generation {generation_id} not found")
        if record.status not in ("failed", "cancelled"):
            raise HTTPException(409, detail=f"generation {generation_id} is {record.status}: only failed or cancelled ones resume")
        try:  # admitted like a submission (active and queue limits), in the same serialised transaction
            requeued = await self._api(self.store.requeue, generation_id, principal.subject, limits=self.args.limits)
        except AdmissionRefused as exc:
            raise refused(exc.refusal) from None
        if not requeued:
            raise HTTPException(409, detail=f"generation {generation_id} cannot be resumed now")
        self.worker.wake()
        return {"generation_id": generation_id, "status": "queued"}

    @route("GET", "/api/artifacts/{key:path}", response_class=Response,
             responses={200: {"content": {"image/png": {}}, "description": "the image"}, **responses(403, 404, 503)})
    async def artifact(self, key: str, expires: str = "", sig: str = "") -> Response:
        try:
            verify_signed(f"/api/artifacts/{key}", expires, sig, self.url_secret)
            data = await self._api(self.artifacts.get, key)
        except SignatureError as exc:
            raise HTTPException(403, detail=f"artifact link: {exc}") from None
        except (ArtifactNotFound, ValueError):
            raise HTTPException(404, detail="artifact not found") from None
        media = mimetypes.guess_type(key)[0] or "application/octet-stream"
        return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=300"})

    def _traces(self, generation_id: str, owner: str) -> TraceWriter:
        if self.store.get(generation_id, owner) is None:
            raise HTTPException(404, detail=f"generation {generation_id} not found")
        return TraceWriter(self.trace_store, generation_id, artifacts=self.artifacts)

    @route("GET", "/api/generations/{generation_id}/traces", response_model=TraceListing, responses=responses(*AUTHED, *JOB_STORE, 404))
    async def traces(self, generation_id: str, principal: Principal = Depends(principal)) -> dict:
        check_generation_id(generation_id)
        def listing() -> list[str]:
            return self._traces(generation_id, principal.subject).list_files()

        files = await self._api(listing)
        if not files:
            raise HTTPException(404, detail="no trace files: they are removed on completion unless traces.keep is set")
        return {"generation_id": generation_id, "files": files}

    @route("GET", "/api/generations/{generation_id}/traces/{name:path}", response_class=Response, responses={
        200: {"content": {"text/plain": {}, "application/json": {}, "image/png": {}}, "description": "the trace file"},
        **responses(*AUTHED, *JOB_STORE, 400, 404)})
    async def trace_file(self, generation_id: str, name: str = Path(..., json_schema_extra={"pattern": TRACE_NAME_PATTERN}),
                         principal: Principal = Depends(principal)) -> Response:
        check_generation_id(generation_id)
        check_trace_name(name)
        def read() -> bytes:
            return self._traces(generation_id, principal.subject).read_file(name)

        try:
            data = await self._api(read)
        except (ArtifactNotFound, ValueError, FileNotFoundError):
            raise HTTPException(404, detail=f"trace file {name} not found") from None
        media = mimetypes.guess_type(name)[0] or "text/plain"
        return Response(data, media_type=media)


def cancel_answer(generation_id: str, status: str) -> dict:
    """The DELETE's answer for the job's status right after the cancel was recorded: final or
    not, and what that means, in words (CancelRequested)."""
    if status == "cancelled":
        message = "cancelled; finished scenes are kept"
    elif status == "completed":
        message = "the generation completed before the cancel could stop it: its last scene was already finishing"
    elif status == "failed":
        message = "the generation failed before the cancel could stop it; finished scenes are kept"
    else:
        message = (
            "cancel recorded: the generation stops at its next step and ends `cancelled`, unless the scene "
            "it is finishing is its last, in which case it ends `completed`; the status says how it ended"
        )
    return {"generation_id": generation_id, "status": status, "cancel_requested": True,
            "final": status in FINISHED, "message": message}


def refused(refusal: Refusal) -> HTTPException:
    """A refused admission as its answer: 429 or 503, the reason, and when to try again."""
    return HTTPException(refusal.status_code, detail=refusal.reason, headers={"Retry-After": str(refusal.retry_after_s)})
