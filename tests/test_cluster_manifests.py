"""The cluster files (cluster/) against the schemas of the tools that read them, made strict, and
against the checks schemas cannot make (upgrade strategy, GPU room, pinned Ray). No Ray cluster:
these read files and pydantic/JSON schemas only."""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest
import ray
import yaml

from cluster import capacity, check, rayservice, schemas

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def manifest() -> dict:
    return check.load(check.RAYSERVICE)


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return check.load(rayservice.SERVE_CONFIG)


@pytest.fixture(scope="module")
def launcher() -> dict:
    return check.load(check.LAUNCHER)


def mutated(doc: dict, change) -> dict:
    doc = copy.deepcopy(doc)
    change(doc)
    return doc


# ---- the KubeRay CRD, strict --------------------------------------------------------------------

def test_crd_is_vendored_with_its_licence():
    crd_dir = ROOT / "cluster" / "kuberay" / "crd"
    assert "Apache License" in (crd_dir / "LICENSE").read_text()
    crd = yaml.load((crd_dir / "ray.io_rayservices.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == "RayService"
    assert "v1" in [v["name"] for v in crd["spec"]["versions"]]


def test_rayservice_validates_against_the_strict_crd(manifest):
    assert schemas.rayservice_errors(manifest) == []


@pytest.mark.parametrize(
    "change, word",
    [
        (lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(maxReplica=4), "maxReplica"),
        (lambda m: m["spec"]["rayClusterConfig"].update(enableInTreeAutoScaling=True), "enableInTreeAutoScaling"),
        (lambda m: m["spec"]["upgradeStrategy"].update(typ="NewCluster"), "typ"),
        (lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            resource={"limits": {"cpu": "2"}}), "resource"),
        (lambda m: [e for e in m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
                    if "valueFrom" in e][0]["valueFrom"]["secretKeyRef"].update(nam="x"), "nam"),
        (lambda m: m["metadata"].update(lables={"a": "b"}), "lables"),
    ],
    ids=["maxReplica", "enableInTreeAutoScaling", "upgrade-typ", "container-resource", "secretKeyRef-nam", "metadata-lables"],
)
def test_a_misspelled_field_is_rejected(manifest, change, word):
    errors = schemas.rayservice_errors(mutated(manifest, change))
    assert errors and any(word in e for e in errors), errors


def test_wrong_types_and_kinds_are_rejected(manifest):
    limits = lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert schemas.rayservice_errors(mutated(manifest, lambda m: limits(m).update(cpu=["8"])))
    assert schemas.rayservice_errors(mutated(manifest, lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(maxReplicas="4")))
    assert schemas.rayservice_errors(mutated(manifest, lambda m: m.update(apiVersion="ray.io/v1alpha1")))
    assert schemas.rayservice_errors(mutated(manifest, lambda m: m.update(kind="RayCluster")))


def test_strict_conversion_rules():
    schema = schemas.strict({
        "type": "object",
        "properties": {
            "port": {"x-kubernetes-int-or-string": True},
            "note": {"type": "string", "nullable": True},
            "free": {"type": "object", "properties": {"a": {"type": "integer"}}, "x-kubernetes-preserve-unknown-fields": True},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    })
    assert schemas.schema_errors({"port": 80, "note": None, "free": {"a": 1, "b": 2}, "map": {"x": "y"}}, schema) == []
    assert schemas.schema_errors({"port": "http"}, schema) == []
    assert schemas.schema_errors({"port": 1.5}, schema)
    assert schemas.schema_errors({"prot": 80}, schema)
    assert schemas.schema_errors({"map": {"x": 1}}, schema)


def test_the_fetch_job_pod_validates_against_the_crds_pod_spec():
    job = check.load(check.FETCH_JOB)
    pod = job["spec"]["template"]["spec"]
    assert schemas.schema_errors(pod, schemas.pod_spec_schema()) == []
    assert schemas.schema_errors(mutated(pod, lambda p: p["containers"][0].update(volumMounts=[])), schemas.pod_spec_schema())
    claim = check.load(check.CLUSTER / "kuberay" / "model-cache.yaml")
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["metadata"]["name"] == pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert set(claim["spec"]["accessModes"]) <= {"ReadWriteMany", "ReadOnlyMany"}  # GPU pods on many nodes
    gpu_pod = check.load(check.RAYSERVICE)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    cache = [v for v in gpu_pod["volumes"] if v["name"] == "model-cache"][0]["persistentVolumeClaim"]
    assert cache == {"claimName": claim["metadata"]["name"], "readOnly": True}


def test_workers_get_the_model_cache_offline_and_secrets_from_secrets(manifest):
    gpu = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    container = gpu["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_HUB_OFFLINE"]["value"] == "1"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["HF_HOME"]["value"].startswith(mounts["model-cache"] + "/")
    for name in ("SCENEREF_JWT_SECRET", "OPENAI_API_KEY", "SCENEREF_DATABASE_URL",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert env["RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY"]["value"] == "1"
    head_env = {e["name"]: e.get("value") for e in manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert head_env["RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY"] == "1"  # the controller places replicas


# ---- serveConfigV2: generated, and valid for Serve ----------------------------------------------

def test_serve_config_v2_is_what_serve_config_yaml_generates(manifest, serve_config):
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == rayservice.serve_config_v2(serve_config)
    assert rayservice.generated_matches(), "run `python -m cluster.rayservice` and commit the manifest"


def test_generator_check_fails_on_drift_and_rewrite_fixes_it(tmp_path, capsys):
    config, target = tmp_path / "serve.yaml", tmp_path / "rayservice.yaml"
    text = rayservice.SERVE_CONFIG.read_text()
    config.write_text(text)
    target.write_text(check.RAYSERVICE.read_text())
    args = ["--serve-config", str(config), "--manifest", str(target)]
    assert rayservice.main(args) == 0 and rayservice.main(args + ["--check"]) == 0
    before = target.read_text()
    changed = yaml.safe_load(text)
    changed["applications"][0]["args"]["url_ttl_s"] = 1234
    config.write_text(yaml.safe_dump(changed, sort_keys=False))
    assert rayservice.main(args + ["--check"]) == 1
    assert target.read_text() == before  # --check changes nothing
    assert rayservice.main(args) == 0
    assert rayservice.main(args + ["--check"]) == 0
    after = target.read_text()
    assert yaml.safe_load(yaml.safe_load(after)["spec"]["serveConfigV2"])["applications"][0]["args"]["url_ttl_s"] == 1234
    keep = lambda t: [line for line in t.splitlines() if line.lstrip().startswith("#") and "GENERATED" not in line]
    assert keep(after) == keep(before)  # the operator's comments outside the block survive
    assert yaml.safe_load(after)["spec"]["rayClusterConfig"] == yaml.safe_load(before)["spec"]["rayClusterConfig"]


def test_generator_copies_applications_verbatim_and_refuses_unknown_top_keys():
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"port": 8000},
        "applications": [{"name": "a", "import_path": "m:f", "args": {"scorers": {"x": {"num_gpus": 0.3, "anything": [1]}}},
                          "deployments": [{"name": "D", "ray_actor_options": {"num_gpus": 1}}]}],
    }
    out = rayservice.serve_config_v2(config)
    assert out == config and out["applications"] is not config["applications"]
    block = rayservice.render_block(out, "    ")
    assert all(line.startswith("    ") for line in block.splitlines() if line)
    assert yaml.safe_load(block) == config
    with pytest.raises(ValueError, match="servecfg"):
        rayservice.serve_config_v2(config | {"servecfg": 1})
    with pytest.raises(ValueError, match="exactly one"):
        rayservice.update_manifest("spec:\n  x: 1\n", config)


def test_serve_config_v2_validates_against_serves_schema(manifest):
    assert schemas.serve_config_errors(yaml.safe_load(manifest["spec"]["serveConfigV2"])) == []


def test_unknown_serve_keys_are_found_at_every_level(manifest):
    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    bad = mutated(config, lambda c: (
        c.update(proxy_locaton="EveryNode"),
        c["http_options"].update(request_timeout=5),
        c["applications"][0].update(rout_prefix="/x"),
        c["applications"][0]["deployments"][0].update(max_ongoing_request=3),
        c["applications"][0]["deployments"][0]["ray_actor_options"].update(num_gpu=1),
        c["applications"][0]["deployments"][0]["autoscaling_config"].update(max_replica=9),
    ))
    errors = "\n".join(schemas.serve_config_errors(bad))
    for word in ("proxy_locaton", "request_timeout", "rout_prefix", "max_ongoing_request", "num_gpu", "max_replica"):
        assert re.search(rf"\b{word}: unknown key", errors), (word, errors)
    assert schemas.serve_config_errors(mutated(config, lambda c: c["applications"][0].pop("import_path")))


# ---- the cluster launcher ----------------------------------------------------------------------

def test_launcher_config_validates_against_rays_schema(launcher):
    assert schemas.launcher_errors(launcher) == []


def test_launcher_typos_are_rejected(launcher):
    assert schemas.launcher_errors(mutated(launcher, lambda c: c.update(max_worker=3)))
    assert schemas.launcher_errors(mutated(launcher, lambda c: c["available_node_types"]["gpu"].update(max_worker=3)))
    assert schemas.launcher_errors(mutated(launcher, lambda c: c["docker"].update(imag="x")))


def test_launcher_head_runs_no_work(launcher):
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    start = " ".join(launcher["head_start_ray_commands"])
    assert "--num-cpus=0" in start and "--num-gpus=0" in start
    assert "RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY=1" in start


# ---- what schemas miss -------------------------------------------------------------------------

def test_upgrade_strategy_is_one_kuberay_knows(manifest):
    assert capacity.upgrade_errors(manifest) == []
    assert capacity.upgrade_errors(mutated(manifest, lambda m: m["spec"]["upgradeStrategy"].update(type="Newcluster")))
    incremental = mutated(manifest, lambda m: m["spec"]["upgradeStrategy"].update(type="NewClusterWithIncrementalUpgrade"))
    assert capacity.upgrade_errors(incremental)  # needs clusterUpgradeOptions


def test_head_runs_no_gpu_work(manifest):
    assert capacity.head_errors(manifest) == []
    head = lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert capacity.head_errors(mutated(manifest, lambda m: head(m)["rayStartParams"].update({"num-cpus": "4"})))
    assert capacity.head_errors(mutated(manifest, lambda m: head(m)["template"]["spec"]["containers"][0]["resources"]["limits"]
                                        .update({"nvidia.com/gpu": 1})))


def test_gpu_groups_cover_the_scorers_at_max_replicas(manifest, launcher, serve_config):
    gpu_demand = [d for d in capacity.demands(serve_config) if d.num_gpus > 0]
    assert len(gpu_demand) >= 4, gpu_demand  # the four scorers, wherever the config keeps them
    assert capacity.capacity_errors(serve_config, capacity.kuberay_groups(manifest)) == []
    assert capacity.capacity_errors(serve_config, capacity.launcher_groups(launcher)) == []
    short = mutated(manifest, lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(maxReplicas=1))
    assert any("GPU" in e for e in capacity.capacity_errors(serve_config, capacity.kuberay_groups(short)))


def _app(deployments=None, scorers=None):
    return {"applications": [{"name": "a", "import_path": "m:f", "args": {"scorers": scorers} if scorers else {},
                              "deployments": deployments or []}]}


GPU_NODE = [capacity.Group("gpu", 1, 8, 2)]


def test_demands_read_either_place_and_deployments_win():
    in_deployments = _app(deployments=[{"name": "PickScore", "ray_actor_options": {"num_cpus": 1, "num_gpus": 0.6},
                                        "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}])
    in_args = _app(scorers={"pickscore": {"num_gpus": 0.6, "num_cpus": 1, "autoscaling_config": {"max_replicas": 3}}})
    both = _app(scorers={"pickscore": {"num_gpus": 0.6, "autoscaling_config": {"max_replicas": 3}}},
                deployments=[{"name": "PickScore", "ray_actor_options": {"num_cpus": 1, "num_gpus": 0.2}}])
    assert [(d.num_gpus, d.max_replicas) for d in capacity.demands(in_deployments)] == [(0.6, 3)]
    assert [(d.num_gpus, d.max_replicas) for d in capacity.demands(in_args)] == [(0.6, 3)]
    assert [(d.num_gpus, d.max_replicas) for d in capacity.demands(both)] == [(0.2, 3)]
    # 3 x 0.6 = 1.8 GPUs fits the sum of 2 GPUs but not one GPU each: the packing catches it
    for config in (in_deployments, in_args):
        assert any("pack" in e for e in capacity.capacity_errors(config, GPU_NODE))
    assert capacity.capacity_errors(both, GPU_NODE) == []


def test_packing_and_cpu_room():
    assert capacity.pack_gpus([0.5, 0.25, 0.15, 0.1] * 4, 4) is not None
    assert capacity.pack_gpus([0.5, 0.25, 0.15, 0.1] * 4 + [0.05], 4) is None
    assert capacity.pack_gpus([1, 1, 0.5], 2) is None and capacity.pack_gpus([2, 0.5], 3) is not None
    heavy = _app(deployments=[{"name": "S", "ray_actor_options": {"num_cpus": 6, "num_gpus": 0.5}, "num_replicas": 3}])
    assert any("CPUs beside their GPUs" in e for e in capacity.capacity_errors(heavy, GPU_NODE))
    too_big = _app(deployments=[{"name": "S", "ray_actor_options": {"num_cpus": 1, "num_gpus": 2}}])
    assert any("largest GPU node" in e for e in capacity.capacity_errors(too_big, [capacity.Group("gpu", 1, 8, 4)]))
    assert capacity.quantity("500m") == 0.5 and capacity.quantity(8) == 8


# ---- the image ---------------------------------------------------------------------------------

def test_image_ray_version_is_the_pinned_one(manifest):
    dockerfile = check.DOCKERFILE.read_text()
    assert check.dockerfile_ray_version(dockerfile) == ray.__version__
    assert check.version_errors(dockerfile, manifest, ray.__version__, check.pinned_ray_specifier()) == []
    older = dockerfile.replace(f"RAY_VERSION={ray.__version__}", "RAY_VERSION=2.39.0")
    errors = check.version_errors(older, manifest, ray.__version__, check.pinned_ray_specifier())
    assert len(errors) >= 2, errors  # not the venv's Ray, and not the RayService's rayVersion
    with pytest.raises(ValueError):
        check.dockerfile_ray_version("FROM python:3.11\n")


def test_dockerfile_copies_only_what_exists_and_bakes_with_the_fetch_command():
    text = check.DOCKERFILE.read_text()
    ignore = (check.CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    assert "**" in ignore  # the build context is only what the image needs (no .venv, no output/)
    for line in re.findall(r"^COPY\s+(.*)$", text, re.MULTILINE):
        sources = [s for s in line.split()[:-1] if not s.startswith("--")]
        for source in sources:
            if "*" not in source:
                assert (ROOT / source).exists(), source
            stem = source.rstrip("*/")
            assert any(stem == a or stem.startswith(a + "/") for a in allowed), f"{source} is kept out by the .dockerignore"
    assert "sceneref models fetch --config serve_config.yaml" in text
    assert re.search(r"^ENV HF_HOME=/models/huggingface", text, re.MULTILINE)
    assert re.search(r"^ENV HF_HUB_OFFLINE=1", text, re.MULTILINE)


def test_code_packages_never_import_cluster():
    for package in ("pipeline", "scorers", "deployments"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any(n == "cluster" or n.startswith("cluster.") for n in names), path


def test_the_check_command_passes():
    assert check.all_errors() == []


# ---- the sizing table (docs/deploy.md) ---------------------------------------------------------

def test_sizing_counts_a_real_architecture_and_the_docs_quote_it():
    from cluster import sizing

    clip_b32 = sizing.count_open_clip("ViT-B-32-quickgelu")  # built on the meta device: no weights
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert f"{clip_b32:,}" in docs
    assert f"{sizing.AESTHETIC_HEAD_PARAMS:,}" in docs


def test_sizing_fractions_cover_each_need_and_count_sets():
    from cluster import sizing

    needs = {"pickscore": 2.97, "clipscore": 1.05, "vqascore": 11.01, "aesthetic": 1.86}
    for card, sets in ((24, 1), (48, 2), (80, 4)):
        fractions, got = sizing.fractions_for(needs, card)
        assert got == sets
        assert all(fractions[n] * card >= needs[n] for n in needs)
        assert got * sum(fractions.values()) <= 1
    assert sizing.fractions_for({"vqascore": 30}, 24)[1] == 0  # does not fit at all
    assert sizing.need_gb(1_000_000_000, "clipscore") == pytest.approx(2 + 0.25 + sizing.CUDA_CONTEXT_GB)
