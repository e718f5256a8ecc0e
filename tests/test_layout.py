"""The layout of DESIGN.md, checked by reading the source: `pipeline/` and `scorers/` are the
product's plain libraries, so they never import the Serve layer, web servers or test code, and
the HTTP status shape lives beside the API rather than in the database layer.

Imports are read with `ast` (not grep), so an import inside a function, where a lazy import
would hide it from a module-level check, counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Top-level modules a library package must never import, and why.
FORBIDDEN = {
    "ray": "the pipeline and scorers run without Ray",
    "deployments": "the Serve layer depends on the pipeline, never the reverse",
    "fastapi": "HTTP belongs to deployments/",
    "uvicorn": "a web server is a test double or a deployment concern",
    "starlette": "HTTP belongs to deployments/",
    "tests": "the product never imports test code",
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _violations(package: str) -> list[str]:
    return _file_violations(sorted((ROOT / package).rglob("*.py")))


def _file_violations(paths: list[Path]) -> list[str]:
    bad = []
    for path in paths:
        for line, module in _imports(path):
            top = module.split(".")[0]
            if top in FORBIDDEN:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({FORBIDDEN[top]})")
    return bad


def test_cli_imports_no_serve_layer():
    """`sceneref token` mints with pipeline.tokens, not deployments.auth."""
    assert _file_violations([ROOT / "pipeline" / "cli.py", ROOT / "pipeline" / "tokens.py"]) == []
    import deployments.auth
    import pipeline.tokens

    assert deployments.auth.mint_token is pipeline.tokens.mint_token


def test_pipeline_imports_no_serve_layer_web_server_or_tests():
    assert _violations("pipeline") == []


def test_scorers_import_no_serve_layer_web_server_or_tests():
    assert _violations("scorers") == []


def test_no_test_doubles_in_the_product_package():
    """The fake OpenAI server and the pixel scorer are test doubles: they live under tests/."""
    assert not (ROOT / "pipeline" / "testing.py").exists()
    assert (ROOT / "tests" / "doubles.py").exists()


def test_status_shape_is_not_defined_in_the_database_layer():
    """`to_status` builds the HTTP status body; the job store only stores. pipeline.jobs may
    re-export it for old callers, but it is defined in pipeline.status."""
    jobs = ast.parse((ROOT / "pipeline" / "jobs.py").read_text())
    defined = {node.name for node in jobs.body if isinstance(node, ast.FunctionDef)}
    assert "to_status" not in defined
    import pipeline.jobs
    import pipeline.status

    assert pipeline.status.to_status.__module__ == "pipeline.status"
    assert pipeline.jobs.to_status is pipeline.status.to_status


def test_offline_providers_split_by_what_they_are():
    """Agents (storyboard writer, prompt engineer) and images (renderer) are separate modules;
    `from pipeline.offline import X` keeps working for the names callers use."""
    from pipeline.offline import (  # noqa: F401
        OfflineChat,
        OfflineImages,
        infer_task,
        last_user_payload,
        offline_reply,
        render_offline_image,
    )
    from pipeline.offline import agents, images

    assert OfflineChat.__module__ == agents.__name__
    assert OfflineImages.__module__ == images.__name__
    assert render_offline_image.__module__ == images.__name__
    assert not (ROOT / "pipeline" / "offline.py").exists()
