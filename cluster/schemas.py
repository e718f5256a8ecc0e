"""Schema checks for the cluster files, stricter than the tools that read them.

Kubernetes prunes fields a CRD does not declare and Ray Serve ignores keys its models do not
know, so a misspelled `maxReplica` or `num_gpu` would be dropped without a word and the cluster
would run with defaults. These checks turn such typos into errors before anything is applied:
- the KubeRay CRD's openAPIV3Schema becomes a strict JSON Schema (no undeclared properties);
- serve configs go through Ray's own ServeDeploySchema, plus a walk that refuses unknown keys;
- launcher configs go through the JSON Schema that Ray ships for `ray up`.
"""

from __future__ import annotations

import json
import types
import typing
from functools import lru_cache
from pathlib import Path

import jsonschema
import yaml

CRD = Path(__file__).resolve().parent / "kuberay" / "crd" / "ray.io_rayservices.yaml"

# The root `metadata` is an ObjectMeta that the CRD leaves open (the API server checks it);
# these are the fields a manifest in this repository may set there.
_OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def strict(node):
    """An OpenAPI v3 (Kubernetes structural) schema as a JSON Schema that refuses unknown fields.

    - `properties` without x-kubernetes-preserve-unknown-fields: additionalProperties false;
    - x-kubernetes-int-or-string: an integer or a string;
    - nullable: null is allowed too;
    - other x-kubernetes-* extensions (list types, CEL rules) have no JSON Schema meaning: dropped.
    """
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":  # a map of names to schemas, not a schema itself
            out[key] = {name: strict(sub) for name, sub in value.items()}
        elif not key.startswith("x-kubernetes-") and key != "nullable":
            out[key] = strict(value)
    if "properties" in node:
        if not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            out["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        kinds = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = kinds + ["null"]
    return out


@lru_cache(maxsize=4)
def crd_schema(crd_path: Path = CRD, version: str = "v1") -> dict:
    """The strict JSON Schema of one version of the vendored CRD."""
    # The CRD is 1 MB of YAML: libyaml's loader reads it in a fraction of the pure-Python time.
    crd = yaml.load(crd_path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema = strict(entry["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = _OBJECT_META
            schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
            schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/{version}"}
            schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
            return schema
    raise KeyError(f"{crd_path} has no version {version}")


def pod_spec_schema(crd_path: Path = CRD) -> dict:
    """The CRD's embedded (strict) Kubernetes PodSpec: checks pod templates of plain Jobs too."""
    spec = crd_schema(crd_path)["properties"]["spec"]["properties"]["rayClusterConfig"]
    return spec["properties"]["headGroupSpec"]["properties"]["template"]["properties"]["spec"]


def schema_errors(instance, schema: dict) -> list[str]:
    """Every violation, each with the path where it is (not just the first one)."""
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def rayservice_errors(manifest: dict, crd_path: Path = CRD) -> list[str]:
    return schema_errors(manifest, crd_schema(crd_path))


# ---- Ray Serve configs -------------------------------------------------------------------------

def serve_config_errors(config: dict) -> list[str]:
    """Ray's ServeDeploySchema, then the unknown-key walk over its models."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    return unknown_keys(config, ServeDeploySchema)


def unknown_keys(value, model, path: str = "") -> list[str]:
    """Keys of `value` that pydantic `model` (and the models nested in it) do not declare.

    Free-form fields (dicts such as the application's `args`, `user_config`, `runtime_env`) are
    not walked: Ray hands them to our code, and the app checks `args` itself (extra="forbid").
    """
    if not isinstance(value, dict):
        return []
    fields = model.model_fields
    names = {field.alias or name: name for name, field in fields.items()} | {name: name for name in fields}
    problems = []
    for key, sub in value.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            problems.append(f"{where}: unknown key for {model.__name__} (Ray would ignore it)")
            continue
        problems += _walk(sub, fields[names[key]].annotation, where)
    return problems


def _walk(value, annotation, path: str) -> list[str]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _walk(value, args[0], path)
    if origin in (typing.Union, types.UnionType):
        models = [a for a in args if _is_model(a) or typing.get_origin(a) in (list, typing.List)]
        return _walk(value, models[0], path) if len(models) == 1 else []
    if origin in (list, typing.List) and isinstance(value, list) and args:
        return [p for i, item in enumerate(value) for p in _walk(item, args[0], f"{path}[{i}]")]
    if _is_model(annotation):
        return unknown_keys(value, annotation, path)
    return []


def _is_model(annotation) -> bool:
    return isinstance(annotation, type) and hasattr(annotation, "model_fields")


# ---- Ray cluster launcher ----------------------------------------------------------------------

def launcher_schema() -> dict:
    """The JSON Schema that the installed Ray ships for `ray up` configs."""
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def launcher_errors(config: dict) -> list[str]:
    return schema_errors(config, launcher_schema())
