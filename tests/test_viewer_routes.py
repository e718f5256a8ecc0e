"""The viewer's routes (deployments/viewer.py) on a plain FastAPI app, no Ray: the page at / and
/viewer with its base href and security headers, static files with their content types and
revalidation, nothing outside deployments/web/ reachable, and none of it in the OpenAPI
document (the API contract test fuzzes only the API)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from deployments.api import create_api
from deployments.auth import Authenticator, AuthSettings
from deployments.viewer import FILES, WEB_DIR, ViewerRoutes


class Server(ViewerRoutes):
    pass


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setenv("SCENEREF_JWT_SECRET", "x" * 32)
    app = create_api(Server(), authenticator=Authenticator(AuthSettings()), upload_limit_bytes=1024)
    return TestClient(app)


@pytest.mark.parametrize("path", ["/", "/viewer"])
def test_page_is_served_with_its_base_and_policy(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert '<base href="/">' in response.text
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert response.headers["cache-control"] == "no-cache"


def test_page_under_a_route_prefix_points_its_links_there(monkeypatch):
    monkeypatch.setenv("SCENEREF_JWT_SECRET", "x" * 32)
    app = create_api(Server(), authenticator=Authenticator(AuthSettings()), upload_limit_bytes=1024)
    response = TestClient(app, root_path="/sceneref").get("/viewer")
    assert '<base href="/sceneref/">' in response.text


@pytest.mark.parametrize("name,kind", [
    ("app.js", "text/javascript; charset=utf-8"),
    ("style.css", "text/css; charset=utf-8"),
    ("diff.js", "text/javascript; charset=utf-8"),
])
def test_static_files_have_their_types_and_revalidate(client, name, kind):
    response = client.get(f"/viewer/static/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == kind
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content == (WEB_DIR / name).read_bytes()
    again = client.get(f"/viewer/static/{name}", headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize("path", [
    "/viewer/static/../viewer.py",
    "/viewer/static/%2e%2e/viewer.py",
    "/viewer/static/..%2fviewer.py",
    "/viewer/static/%2Fetc%2Fpasswd",
    "/viewer/static//etc/passwd",
    "/viewer/static/nothing.js",
    "/viewer/static/index.html",  # the page only at / and /viewer, with its base filled in
    "/viewer/static/",
])
def test_nothing_outside_the_web_folder_is_served(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert b"import" not in response.content and b"root:" not in response.content


def test_viewer_routes_are_not_in_the_api_document(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/viewer")]


def test_every_module_the_page_imports_is_served():
    """A renamed module would only show up as a blank page in a browser: check the imports."""
    index = FILES["index.html"].body.decode()
    wanted = set(re.findall(r'(?:src|href)="viewer/static/([^"]+)"', index))
    for name, item in FILES.items():
        if name.endswith(".js"):
            wanted |= set(re.findall(r'from "\./([^"]+)"', item.body.decode()))
    assert wanted and wanted <= set(FILES)
    assert {"app.js", "api.js", "generation.js", "views.js", "diff.js", "dom.js", "style.css"} <= wanted
