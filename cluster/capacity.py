"""Checks that schemas cannot make: does the cluster have room for what Serve will ask of it?

Serve asks Ray for each replica's `ray_actor_options`; with autoscaling, up to `max_replicas` of
each deployment. A GPU fraction below 1 must fit on one GPU, so the question is a packing one:
can every GPU replica at its maximum count be packed into the GPUs the worker groups can grow to?
If not, the extra replicas stay pending for ever and the autoscaler cannot help.

Where a deployment's options live is the production config's business: a `deployments:` entry
(Serve's own place) or the application's typed `args.scorers.<name>`; both are read, and a
`deployments:` entry wins field by field because Serve applies it last.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# KubeRay 1.x (v1.7.0's controller) acts on these spec.upgradeStrategy.type values; the CRD
# itself only says "string", so a typo would reach the operator and be refused there.
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
TOLERANCE = 1e-6


@dataclass(frozen=True)
class Demand:
    name: str
    num_gpus: float
    num_cpus: float
    max_replicas: int


def _key(name: str) -> str:
    """PickScore, pickscore and pick_score name the same deployment."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _max_replicas(entry: dict) -> int | None:
    auto = entry.get("autoscaling_config") or {}
    for value in (entry.get("max_replicas"), auto.get("max_replicas"), entry.get("num_replicas")):
        if isinstance(value, int):
            return value
    return None


def _options(entry: dict) -> dict:
    """num_gpus / num_cpus / max_replicas that one config entry sets (absent ones left out)."""
    actor = entry.get("ray_actor_options") or {}
    found = {}
    for field in ("num_gpus", "num_cpus"):
        value = actor.get(field, entry.get(field))
        if value is not None:
            found[field] = float(value)
    replicas = _max_replicas(entry)
    if replicas is not None:
        found["max_replicas"] = replicas
    return found


def demands(serve_config: dict) -> list[Demand]:
    """Every deployment's resources at its maximum replica count, from either place."""
    result = []
    for app in serve_config.get("applications", []):
        merged: dict[str, tuple[str, dict]] = {}
        for name, entry in ((app.get("args") or {}).get("scorers") or {}).items():
            if isinstance(entry, dict):
                merged[_key(name)] = (name, _options(entry))
        for entry in app.get("deployments") or []:
            name = entry["name"]
            base = merged.get(_key(name), (name, {}))[1]
            merged[_key(name)] = (name, base | _options(entry))
        for name, opts in merged.values():
            result.append(Demand(name, opts.get("num_gpus", 0.0), opts.get("num_cpus", 1.0), opts.get("max_replicas", 1)))
    return result


def pack_gpus(fractions: list[float], gpus: int) -> list[float] | None:
    """First-fit decreasing of GPU fractions into `gpus` whole GPUs: the load per GPU, or None.

    Whole-GPU requests (1, 2, ...) take whole GPUs. First fit decreasing can miss a packing that
    exists, so a None errs on the safe side (asks for more GPUs than strictly needed).
    """
    loads = [0.0] * gpus
    for fraction in sorted(fractions, reverse=True):
        if fraction >= 1:
            need = int(round(fraction))
            free = [i for i, load in enumerate(loads) if load == 0.0][:need]
            if len(free) < need:
                return None
            for i in free:
                loads[i] = 1.0
            continue
        for i, load in enumerate(loads):
            if load + fraction <= 1.0 + TOLERANCE:
                loads[i] = load + fraction
                break
        else:
            return None
    return loads


def quantity(value) -> float:
    """A Kubernetes quantity ("8", "500m", 2) as a number of units (CPUs, GPUs)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@dataclass(frozen=True)
class Group:
    name: str
    gpus_per_node: float
    cpus_per_node: float
    max_nodes: int


def kuberay_groups(manifest: dict) -> list[Group]:
    """The worker groups of a RayService (the head runs no replicas; checked separately)."""
    groups = []
    for group in manifest["spec"]["rayClusterConfig"].get("workerGroupSpecs", []):
        limits = {}
        for container in group["template"]["spec"]["containers"]:
            limits = (container.get("resources") or {}).get("limits") or {}
            break  # Ray runs in the first container
        params = group.get("rayStartParams") or {}
        gpus = quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        cpus = quantity(params.get("num-cpus", limits.get("cpu", 0)))
        groups.append(Group(group["groupName"], gpus, cpus, int(group.get("maxReplicas", 0))))
    return groups


def launcher_groups(config: dict) -> list[Group]:
    """The worker node types of a `ray up` config (the head node type left out)."""
    head = config["head_node_type"]
    return [
        Group(name, float(spec["resources"].get("GPU", 0)), float(spec["resources"].get("CPU", 0)), int(spec.get("max_workers", 0)))
        for name, spec in config["available_node_types"].items()
        if name != head
    ]


def capacity_errors(serve_config: dict, groups: list[Group]) -> list[str]:
    """Room for every deployment at max_replicas: GPUs packed per GPU, CPUs per node kind."""
    wanted = demands(serve_config)
    errors = []
    gpu_replicas = [d for d in wanted if d.num_gpus > 0]
    gpu_groups = [g for g in groups if g.gpus_per_node > 0]
    total_gpus = int(sum(g.gpus_per_node * g.max_nodes for g in gpu_groups))
    need = sum(d.num_gpus * d.max_replicas for d in gpu_replicas)
    if need > total_gpus + TOLERANCE:
        errors.append(f"GPU deployments need {need:g} GPUs at max_replicas; the GPU worker groups reach {total_gpus}")
    elif pack_gpus([d.num_gpus for d in gpu_replicas for _ in range(d.max_replicas)], total_gpus) is None:
        errors.append(f"the GPU replicas' fractions do not pack into {total_gpus} GPUs")
    biggest = max((g.gpus_per_node for g in gpu_groups), default=0)
    for d in gpu_replicas:
        if d.num_gpus > biggest:
            errors.append(f"{d.name} asks {d.num_gpus:g} GPUs per replica; the largest GPU node has {biggest:g}")
    gpu_cpus = sum(d.num_cpus * d.max_replicas for d in gpu_replicas)
    have_gpu_cpus = sum(g.cpus_per_node * g.max_nodes for g in gpu_groups)
    if gpu_cpus > have_gpu_cpus + TOLERANCE:
        errors.append(f"GPU deployments need {gpu_cpus:g} CPUs beside their GPUs; the GPU nodes reach {have_gpu_cpus:g}")
    all_cpus = sum(d.num_cpus * d.max_replicas for d in wanted)
    have_cpus = sum(g.cpus_per_node * g.max_nodes for g in groups)
    if all_cpus > have_cpus + TOLERANCE:
        errors.append(f"deployments need {all_cpus:g} CPUs at max_replicas; the worker groups reach {have_cpus:g}")
    return errors


def head_errors(manifest: dict) -> list[str]:
    """The head runs no GPU work and no replicas: num-gpus 0, num-cpus 0, no GPU limit."""
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]
    params = head.get("rayStartParams") or {}
    errors = [f"head rayStartParams.{key} must be \"0\", not {params.get(key)!r}"
              for key in ("num-cpus", "num-gpus") if str(params.get(key)) != "0"]
    for container in head["template"]["spec"]["containers"]:
        limits = (container.get("resources") or {}).get("limits") or {}
        if quantity(limits.get("nvidia.com/gpu", 0)) != 0:
            errors.append(f"head container {container['name']} asks for a GPU")
    return errors


def upgrade_errors(manifest: dict) -> list[str]:
    kind = ((manifest["spec"].get("upgradeStrategy") or {}).get("type"))
    if kind not in UPGRADE_TYPES:
        return [f"spec.upgradeStrategy.type {kind!r} is not one of KubeRay's {list(UPGRADE_TYPES)}"]
    if kind == "NewClusterWithIncrementalUpgrade" and not manifest["spec"]["upgradeStrategy"].get("clusterUpgradeOptions"):
        return ["NewClusterWithIncrementalUpgrade needs spec.upgradeStrategy.clusterUpgradeOptions (a Gateway class)"]
    return []
