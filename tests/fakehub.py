"""A stand-in for the Hugging Face Hub on loopback, for `sceneref models fetch` tests.

The fetch command must go through huggingface_hub's own download code (so files land in the cache layout the
loaders read), and the real hub cannot be reached here: this server speaks the hub's HTTP protocol over a
directory laid out as `<org>/<name>/<files>`. The endpoints are the ones huggingface_hub 2.x calls for
snapshot_download / hf_hub_download / HfApi.repo_info / list_repo_tree:

    GET       /api/models/{org}/{name}[/revision/{rev}]     {"id", "sha", "siblings": [{"rfilename"}], ...}
    GET       /api/models/{org}/{name}/tree/{rev}[/{path}]  [{"type": "file", "path", "size", "oid"}, ...]
    HEAD, GET /{org}/{name}/resolve/{rev}/{path}            the bytes; X-Repo-Commit, ETag, Content-Length

Errors come as the hub sends them, with X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo),
which is what huggingface_hub turns into its typed errors. A repo folder holding a `.gated` file is gated: its
files need `Authorization: Bearer <the file's content>`. Every request is recorded (method, path) so a test can
tell what was downloaded; files are read from disk on each request, so a test may change the hub between runs.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

GATED = ".gated"


class Repo:
    """One repo folder: its files (marker files left out) and a commit id derived from their content."""

    def __init__(self, root: Path, repo_id: str):
        self.id = repo_id
        self.dir = root / repo_id
        self.files = {
            p.relative_to(self.dir).as_posix(): p
            for p in sorted(self.dir.rglob("*"))
            if p.is_file() and p.name != GATED
        }
        digest = hashlib.sha1()
        for name, path in self.files.items():
            digest.update(name.encode() + b"\0" + sha256(path).encode() + b"\n")
        self.sha = digest.hexdigest()
        gate = self.dir / GATED
        self.token = gate.read_text().strip() if gate.is_file() else None

    def knows(self, revision: str) -> bool:
        return revision in ("main", self.sha)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FakeHub:
    """`with FakeHub(root) as hub:` serves root at hub.url until the block ends."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakehub", daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def downloads(self) -> list[str]:
        """Paths of the file bodies sent (GET .../resolve/...)."""
        with self._lock:
            return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def repo(self, org: str, name: str) -> Repo | None:
        folder = self.root / org / name
        return Repo(self.root, f"{org}/{name}") if folder.is_dir() else None


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: the test output is for the test
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.record(self.command, path)
            parts = [p for p in path.split("/") if p]
            if len(parts) >= 3 and parts[:2] == ["api", "models"]:
                return self._api(parts[2:])
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(parts[0], parts[1], parts[3], "/".join(parts[4:]), body)
            self._error(404, "NotFound", f"no route for {path}")

        def _api(self, parts: list[str]) -> None:
            if len(parts) < 2:
                return self._error(404, "RepoNotFound", "Repository not found")
            repo = hub.repo(parts[0], parts[1])
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository {parts[0]}/{parts[1]} not found")
            rest = parts[2:]
            revision = rest[1] if len(rest) >= 2 else "main"
            if not repo.knows(revision):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", repo)
            if not rest or rest[0] == "revision":
                return self._json({
                    "id": repo.id, "modelId": repo.id, "sha": repo.sha, "private": False,
                    "gated": "manual" if repo.token else False,
                    "siblings": [{"rfilename": name} for name in repo.files],
                }, repo)
            if rest[0] == "tree":
                prefix = "/".join(rest[2:])
                entries = [
                    {"type": "file", "path": name, "size": file.stat().st_size,
                     "oid": hashlib.sha1(file.read_bytes()).hexdigest()}
                    for name, file in repo.files.items()
                    if not prefix or name.startswith(prefix.rstrip("/") + "/")
                ]
                return self._json(entries, repo)
            self._error(404, "NotFound", f"no API route {'/'.join(parts)}")

        def _resolve(self, org: str, name: str, revision: str, filename: str, body: bool) -> None:
            repo = hub.repo(org, name)
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository {org}/{name} not found", body=body)
            if not repo.knows(revision):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", repo, body=body)
            if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                return self._error(
                    401, "GatedRepo",
                    f"Access to model {repo.id} is restricted. You must have access to it and be authenticated to access it.",
                    repo, body=body,
                )
            file = repo.files.get(filename)
            if file is None:
                return self._error(404, "EntryNotFound", f"{filename} does not exist on {revision}", repo, body=body)
            data = file.read_bytes()
            self.send_response(200)
            self.send_header("X-Repo-Commit", repo.sha)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _json(self, payload, repo: Repo) -> None:
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("X-Repo-Commit", repo.sha)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, code: str, message: str, repo: Repo | None = None, body: bool = True) -> None:
            data = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if repo is not None:
                self.send_header("X-Repo-Commit", repo.sha)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler
