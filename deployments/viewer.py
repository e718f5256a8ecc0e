"""The web viewer's routes, as a mixin the `Ingress` inherits: the page and its static files are
served by the ingress itself, so running the viewer needs no second web server and no build
step (plain HTML, CSS and JavaScript modules in `deployments/web/`).

Only files that exist in `deployments/web/` when this module loads are served: the name in the
URL is looked up in that fixed table, never joined onto a path, so no `..`, symlink or encoded
slash can reach another file. The routes are left out of the OpenAPI document: they are not
part of the API its clients (and the Schemathesis contract test) rely on.
"""

# No `from __future__ import annotations`: FastAPI must see the handlers' real parameter types.
import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException, Request
from fastapi.responses import Response

from deployments.api import route

WEB_DIR = Path(__file__).with_name("web")
INDEX = "index.html"
BASE_MARK = "__SCENEREF_BASE__"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",  # modules need a JavaScript MIME type
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}

# The page talks only to its own origin; images may come from the signed links of
# `public_base_url` (another origin behind a proxy) and from blobs of trace images fetched with
# the token. No inline script: a token in sessionStorage is only as safe as the page's scripts.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data: http: https:; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'; form-action 'self'"
)


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    media_type: str
    etag: str


def _load(directory: Path) -> dict[str, StaticFile]:
    """Every servable file under `directory` by its relative name, read once: the viewer is a
    handful of small files, and an in-memory table is what makes traversal impossible."""
    table: dict[str, StaticFile] = {}
    for path in sorted(directory.rglob("*")):
        media = CONTENT_TYPES.get(path.suffix)
        if not path.is_file() or path.is_symlink() or media is None:
            continue
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        table[path.relative_to(directory).as_posix()] = StaticFile(body, media, etag)
    return table


FILES = _load(WEB_DIR)


def _answer(request: Request, item: StaticFile, cache: str, body: bytes | None = None) -> Response:
    """The file, or 304 when the browser's copy (its ETag) is current: modules are revalidated
    cheaply instead of being cached past a deploy under an unchanging name."""
    headers = {"Cache-Control": cache, "ETag": item.etag, "X-Content-Type-Options": "nosniff"}
    if request.headers.get("if-none-match") == item.etag:
        return Response(status_code=304, headers=headers)
    return Response(item.body if body is None else body, media_type=item.media_type, headers=headers)


class ViewerRoutes:
    """GET / and /viewer: the page; GET /viewer/static/{name}: its scripts and styles."""

    @route("GET", "/", include_in_schema=False)
    async def viewer_root(self, request: Request) -> Response:
        return self._viewer_page(request)

    @route("GET", "/viewer", include_in_schema=False)
    async def viewer_page(self, request: Request) -> Response:
        return self._viewer_page(request)

    @route("GET", "/viewer/static/{name:path}", include_in_schema=False)
    async def viewer_static(self, name: str, request: Request) -> Response:
        item = FILES.get(name)
        if item is None or name == INDEX:
            raise HTTPException(404, detail="not found")
        # Revalidated on every load (ETag): a new deploy is picked up at once, and an unchanged
        # file costs a 304 with no body.
        return _answer(request, item, "no-cache")

    def _viewer_page(self, request: Request) -> Response:
        """index.html with its <base href> set to the app's root path, so the page's relative
        links (static files, /api) work at / , at /viewer and under a Serve route prefix."""
        item = FILES[INDEX]
        root = request.scope.get("root_path", "").rstrip("/")
        body = item.body.replace(BASE_MARK.encode(), (root + "/").encode())
        response = _answer(request, StaticFile(body, item.media_type, item.etag[:-1] + root.replace('"', "") + '"'),
                           "no-cache", body)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["Referrer-Policy"] = "no-referrer"
        return response
