"""Every check of the cluster files in one command, for CI and before `kubectl apply` / `ray up`:

    python -m cluster.check        # prints each problem; exit 1 when there is any

tests/test_cluster_manifests.py runs the same functions one by one.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

import yaml

from cluster import capacity, rayservice, schemas

ROOT = rayservice.ROOT
CLUSTER = ROOT / "cluster"
RAYSERVICE = CLUSTER / "kuberay" / "rayservice.yaml"
FETCH_JOB = CLUSTER / "kuberay" / "fetch-models-job.yaml"
LAUNCHER = CLUSTER / "launcher" / "sceneref-aws.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def dockerfile_ray_version(text: str) -> str:
    """The Ray version the image is built FROM (`ARG RAY_VERSION=...` used in `FROM rayproject/ray:`)."""
    base = re.search(r"^FROM\s+rayproject/ray:(\S+)", text, re.MULTILINE)
    if not base:
        raise ValueError("the Dockerfile is not FROM rayproject/ray")
    tag = base.group(1)
    default = re.search(r"^ARG\s+RAY_VERSION=(\S+)", text, re.MULTILINE)
    if default:
        tag = tag.replace("${RAY_VERSION}", default.group(1)).replace("$RAY_VERSION", default.group(1))
    match = re.fullmatch(r"(\d+\.\d+\.\d+)-py(\d+)-gpu", tag)
    if not match:
        raise ValueError(f"rayproject/ray:{tag} is not a <version>-py<NN>-gpu tag")
    return match.group(1)


def pinned_ray_specifier() -> str:
    """pyproject's requirement on ray (from the installed distribution's metadata, else the file)."""
    try:
        lines = requires("sceneref") or []
    except PackageNotFoundError:
        text = (ROOT / "pyproject.toml").read_text()
        lines = re.findall(r'"(ray\[[^"]*)"', text)
    for line in lines:
        if re.match(r"ray(\[[^\]]*\])?\s*[<>=!~]", line):
            return re.sub(r"^ray(\[[^\]]*\])?\s*", "", line.split(";")[0]).strip()
    raise ValueError("pyproject.toml has no requirement on ray")


def version_errors(dockerfile: str, manifest: dict, ray_version: str, specifier: str) -> list[str]:
    from packaging.specifiers import SpecifierSet

    image = dockerfile_ray_version(dockerfile)
    errors = []
    if image != ray_version:
        errors.append(f"cluster/Dockerfile builds on Ray {image}; the project runs Ray {ray_version}")
    if image not in SpecifierSet(specifier):
        errors.append(f"cluster/Dockerfile's Ray {image} is outside pyproject's ray{specifier}")
    cluster_version = manifest["spec"]["rayClusterConfig"].get("rayVersion")
    if cluster_version != image:
        errors.append(f"the RayService's rayVersion {cluster_version!r} is not the image's {image}")
    return errors


def all_errors() -> list[str]:
    import ray

    serve_config = load(rayservice.SERVE_CONFIG)
    manifest = load(RAYSERVICE)
    launcher = load(LAUNCHER)
    job = load(FETCH_JOB)
    found = [f"rayservice.yaml: {e}" for e in schemas.rayservice_errors(manifest)]
    if not rayservice.generated_matches(RAYSERVICE, rayservice.SERVE_CONFIG):
        found.append("rayservice.yaml: serveConfigV2 has drifted from serve_config.yaml (run python -m cluster.rayservice)")
    found += [f"serveConfigV2: {e}" for e in schemas.serve_config_errors(yaml.safe_load(manifest["spec"]["serveConfigV2"]))]
    found += [f"rayservice.yaml: {e}" for e in capacity.upgrade_errors(manifest) + capacity.head_errors(manifest)]
    found += [f"rayservice.yaml: {e}" for e in capacity.capacity_errors(serve_config, capacity.kuberay_groups(manifest))]
    found += [f"fetch-models-job.yaml: {e}" for e in schemas.schema_errors(job["spec"]["template"]["spec"], schemas.pod_spec_schema())]
    found += [f"sceneref-aws.yaml: {e}" for e in schemas.launcher_errors(launcher)]
    found += [f"sceneref-aws.yaml: {e}" for e in capacity.capacity_errors(serve_config, capacity.launcher_groups(launcher))]
    found += version_errors(DOCKERFILE.read_text(), manifest, ray.__version__, pinned_ray_specifier())
    return found


def main() -> int:
    problems = all_errors()
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"cluster files: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
