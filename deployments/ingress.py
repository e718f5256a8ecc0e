"""The HTTP API: a FastAPI app behind `@serve.ingress`.

Generations run as background tasks of the ingress replica, independent of the request that
started them; the job store holds their state and checkpoints, so the status route reads the
truth and a restarted replica resumes unfinished jobs at their next scene.
"""

# No `from __future__ import annotations` here: FastAPI, through @serve.ingress, must see the
# route parameters' real types (a string `Request` becomes a required field).
import asyncio
import logging
import mimetypes
import uuid
from pathlib import Path

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.adapters import HandleChat, HandleImages, HandleScoring
from deployments.args import AppArgs
from deployments.auth import Authenticator, Principal, bearer_principal
from deployments.signing import SignatureError, sign_url, verify_signed
from deployments.uploads import UploadError, prepare_upload
from pipeline.artifacts import ArtifactNotFound, LocalArtifactStore
from pipeline.jobs import JobStore, to_status
from pipeline.runner import Services
from pipeline.schemas import GenerationRequest
from pipeline.service import execute_job

log = logging.getLogger("sceneref.ingress")
app = FastAPI(title="sceneref", version="0.1.0", description="Reference images for the scenes of a short video.")


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field as `field: message` (plus FastAPI's usual `detail` list)."""
    errors = [
        {"field": ".".join(str(p) for p in e["loc"] if p not in ("body", "query", "path")), "message": e["msg"]}
        for e in exc.errors()
    ]
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return JSONResponse(status_code=422, content={"error": f"invalid request: {summary}", "detail": errors})


_bearer = HTTPBearer(auto_error=False, description="JWT bearer token (see `sceneref token`)")


def _principal(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
    """Routes are declared at import time, the authenticator only exists once the replica has
    its args: it lives on `app.state`. A plain function, so a JWKS fetch runs in a thread."""
    return request.app.state.authenticate(request, credentials)


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        pickscore: DeploymentHandle,
        clipscore: DeploymentHandle,
        vqascore: DeploymentHandle,
        aesthetic: DeploymentHandle,
        generator: DeploymentHandle,
        agents: DeploymentHandle,
        args: AppArgs,
    ):
        self.args = args
        self.settings = args.pipeline
        app.state.authenticate = bearer_principal(Authenticator(args.auth))
        self.url_secret = args.url_secret()
        self.store = JobStore(args.database_url)
        self.artifacts = LocalArtifactStore(self.settings.artifacts_dir)
        weights = self.settings.scoring.weights.as_dict()
        handles = {"pickscore": pickscore, "clipscore": clipscore, "vqascore": vqascore, "aesthetic": aesthetic}
        self.services = Services(
            chat=HandleChat(agents),
            images=HandleImages(generator),
            scoring=HandleScoring({n: h for n, h in handles.items() if weights[n] > 0}),
            artifacts=self.artifacts,
        )
        self.offline = self.settings.images.provider == "offline" or self.settings.llm.provider == "offline"
        self.tasks: set[asyncio.Task] = set()
        if args.resume_unfinished:
            for record in self.store.unfinished():
                log.info("resuming generation %s", record.generation_id)
                self._start(record.generation_id)

    def _start(self, generation_id: str, reference: bytes | None = None) -> None:
        task = asyncio.get_event_loop().create_task(
            execute_job(self.store, generation_id, self.services, self.settings, reference_image=reference)
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _submit(self, request: GenerationRequest, principal: Principal, http: Request, reference: bytes | None) -> dict:
        generation_id = uuid.uuid4().hex
        await asyncio.to_thread(
            self.store.create, generation_id, principal.subject, request.model_dump(mode="json"), offline=self.offline
        )
        self._start(generation_id, reference)
        return {
            "generation_id": generation_id,
            "status": "queued",
            "status_url": str(http.url_for("status", generation_id=generation_id)),
        }

    @app.get("/api/health")
    async def health(self) -> dict:
        return {"status": "ok", "running_generations": len(self.tasks), "offline": self.offline}

    @app.post("/api/generate", status_code=202)
    async def generate(self, body: GenerationRequest, http: Request, principal: Principal = Depends(_principal)) -> dict:
        return await self._submit(body, principal, http, None)

    @app.post("/api/generate-with-image", status_code=202)
    async def generate_with_image(
        self,
        http: Request,
        prompt: str = Form(...),
        image: UploadFile = File(...),
        target_duration: int = Form(15),
        use_advanced_image_generation: bool = Form(True),
        advanced_image_num_variations: int = Form(4),
        advanced_image_max_enhancement_iterations: int = Form(4),
        advanced_image_quality_threshold: float = Form(30.0),
        principal: Principal = Depends(_principal),
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
            reference = await prepare_upload(image, self.args.uploads)
        except UploadError as exc:
            raise HTTPException(exc.status_code, detail=f"image: {exc.detail}") from None
        return await self._submit(request, principal, http, reference)

    @app.get("/api/status/{generation_id}", name="status")
    async def status(self, generation_id: str, http: Request, principal: Principal = Depends(_principal)) -> dict:
        record = await asyncio.to_thread(self.store.get, generation_id, principal.subject)
        if record is None:  # also for another user's id, so ids cannot be probed
            raise HTTPException(404, detail=f"generation {generation_id} not found")
        scenes = await asyncio.to_thread(self.store.scenes, generation_id)
        base = str(http.base_url).rstrip("/")

        def url_for(key: str) -> str:
            return base + sign_url(f"/api/artifacts/{key}", self.url_secret, ttl_s=self.args.url_ttl_s)

        return to_status(record, scenes, url_for).model_dump(mode="json")

    @app.get("/api/artifacts/{key:path}")
    async def artifact(self, key: str, expires: str = "", sig: str = "") -> Response:
        try:
            verify_signed(f"/api/artifacts/{key}", expires, sig, self.url_secret)
            data = await asyncio.to_thread(self.artifacts.get, key)
        except SignatureError as exc:
            raise HTTPException(403, detail=f"artifact link: {exc}") from None
        except (ArtifactNotFound, ValueError):
            raise HTTPException(404, detail="artifact not found") from None
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    def _trace_dir(self, generation_id: str, owner: str) -> Path:
        if self.store.get(generation_id, owner) is None:
            raise HTTPException(404, detail=f"generation {generation_id} not found")
        path = Path(self.settings.traces.root) / generation_id
        if not path.is_dir():
            raise HTTPException(404, detail="no trace files: they are removed on completion unless traces.keep is set")
        return path

    @app.get("/api/generations/{generation_id}/traces")
    async def traces(self, generation_id: str, principal: Principal = Depends(_principal)) -> dict:
        root = await asyncio.to_thread(self._trace_dir, generation_id, principal.subject)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        return {"generation_id": generation_id, "files": files}

    @app.get("/api/generations/{generation_id}/traces/{name:path}")
    async def trace_file(self, generation_id: str, name: str, principal: Principal = Depends(_principal)) -> FileResponse:
        root = (await asyncio.to_thread(self._trace_dir, generation_id, principal.subject)).resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise HTTPException(404, detail=f"trace file {name} not found")
        media = mimetypes.guess_type(path.name)[0] or "text/plain"
        return FileResponse(path, media_type=media)
