"""The layout of docs/architecture.md, checked by reading the source: `pipeline/` and `scorers/` are the
product's plain libraries, so they never import the Serve layer, web servers or test code, and
the HTTP status shape lives beside the job store rather than in it. `pipeline/` is a few
rooms (the generation itself, flat, and the subpackages providers/, jobs/, storage/) with no
import cycles between modules, and a subpackage is used from outside only through the modules
its `__init__.__all__` names.

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
    """The fake OpenAI server and the pixel scorer are test doubles: they live in testkit/, which
    is not installed with the product, beside the tests and benchmarks that use them."""
    assert not (ROOT / "pipeline" / "testing.py").exists()
    assert (ROOT / "testkit" / "doubles.py").exists()


def test_status_shape_is_not_defined_in_the_database_layer():
    """`to_status` builds the HTTP status body; the job store only stores and does not import it."""
    store = ROOT / "pipeline" / "jobs" / "store.py"
    defined = {node.name for node in ast.parse(store.read_text()).body if isinstance(node, ast.FunctionDef)}
    assert "to_status" not in defined
    assert "pipeline.jobs.status" not in {module for _, module in _imports(store)}
    import pipeline.jobs.status

    assert pipeline.jobs.status.to_status.__module__ == "pipeline.jobs.status"


def test_offline_providers_split_by_what_they_are():
    """Agents (storyboard writer, prompt engineer) and images (renderer) are separate modules;
    `from pipeline.providers.offline import X` keeps working for the names callers use."""
    from pipeline.providers.offline import (  # noqa: F401
        OfflineChat,
        OfflineImages,
        infer_task,
        last_user_payload,
        offline_reply,
        render_offline_image,
    )
    from pipeline.providers.offline import agents, images

    assert OfflineChat.__module__ == agents.__name__
    assert OfflineImages.__module__ == images.__name__
    assert render_offline_image.__module__ == images.__name__
    assert not (ROOT / "pipeline" / "offline.py").exists()
    assert not (ROOT / "pipeline" / "providers" / "offline.py").exists()


# The product's code packages: the import-cycle guard reads every module in them.
CODE_PACKAGES = ("pipeline", "scorers", "deployments")
# Subpackages other code uses only through the modules their `__init__.__all__` names.
SUBPACKAGES = ("pipeline.providers", "pipeline.providers.diffusers", "pipeline.jobs", "pipeline.storage")
# Product code held to those public modules (tests may reach inside a room to test it).
PRODUCT = ("pipeline", "scorers", "deployments", "cluster", "benchmarks")


def _module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(root: Path, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that one file imports: a `from a import b` names module a.b when b
    is a module, else a itself; relative imports are resolved; imports in functions count."""
    here = _module_name(root, path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {name for name in candidates if name in known}
    return found - {here}


def _import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    paths = {_module_name(root, path): path for package in packages for path in (root / package).rglob("*.py")}
    known = set(paths)
    return {name: _targets(root, path, known) for name, path in paths.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_import_cycles_between_modules():
    """No module imports one that imports it back, directly or around a loop, even lazily."""
    assert _cycles(_import_graph(ROOT, CODE_PACKAGES)) == []


def test_the_cycle_guard_sees_a_lazy_import_loop(tmp_path):
    """The guard itself: a loop closed by an import inside a function, and one through a
    relative `from . import`, are both found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from pkg import a\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from . import d\n")
    (pkg / "sub" / "d.py").write_text("from ..sub.c import x\n")
    (pkg / "e.py").write_text("import pkg.a\n")
    assert _cycles(_import_graph(tmp_path, ("pkg",))) == [["pkg.a", "pkg.b"], ["pkg.sub.c", "pkg.sub.d"]]


def _public_modules(package: str) -> list[str]:
    tree = ast.parse((ROOT / package.replace(".", "/") / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{package}/__init__.py declares no __all__")


def test_each_subpackage_names_its_public_modules():
    for package in SUBPACKAGES:
        folder = ROOT / package.replace(".", "/")
        for name in _public_modules(package):
            assert (folder / f"{name}.py").is_file() or (folder / name / "__init__.py").is_file(), (
                f"{package}.__all__ names {name}, which is not a module of it"
            )


def _imported_names(path: Path) -> list[tuple[int, str]]:
    """Like `_imports`, but `from a import b` reads as a.b, so a module taken from its package
    (`from pipeline.jobs import tables`) is seen by its full name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def test_other_rooms_use_only_a_subpackages_public_modules():
    """Outside a subpackage, product code imports only the modules its `__init__.__all__` names:
    what a room keeps to itself (the store's tables, the S3 store behind the factory) can change
    without touching another room."""
    public = {package: set(_public_modules(package)) for package in SUBPACKAGES}
    bad = []
    for top in PRODUCT:
        for path in sorted((ROOT / top).rglob("*.py")):
            here = _module_name(ROOT, path)
            for line, module in _imported_names(path):
                for package in sorted(SUBPACKAGES, key=len, reverse=True):
                    if not module.startswith(package + ".") or here == package or here.startswith(package + "."):
                        continue
                    name = module[len(package) + 1:].split(".")[0]
                    if name not in public[package]:
                        bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}: not in {package}.__all__")
                    break
    assert bad == []


# Who may import the shared servers and doubles of testkit/, and who may import tests/.
NEVER_TESTKIT = ("pipeline", "scorers", "deployments", "cluster")
NEVER_TESTS = ("pipeline", "scorers", "deployments", "cluster", "benchmarks", "testkit")


def test_benchmarks_import_product_code_and_testkit_never_tests():
    """Only pytest imports tests/: a benchmark that needs a test server or double takes it from
    testkit/, and the product imports neither (testkit is not installed with it)."""
    bad = []
    for top in NEVER_TESTS:
        for path in sorted((ROOT / top).rglob("*.py")):
            for line, module in _imports(path):
                root = module.split(".")[0]
                if root == "tests" or (root == "testkit" and top in NEVER_TESTKIT):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert bad == []
    import tomllib

    import setuptools  # the packages pyproject.toml installs: testkit is not among them

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    found = setuptools.find_packages(str(ROOT), include=include)
    assert "pipeline" in found and not [name for name in found if name.split(".")[0] in ("testkit", "tests")]
