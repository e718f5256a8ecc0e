"""Writes the RayService's `serveConfigV2` from serve_config.yaml, so the two never drift.

    python -m cluster.rayservice            # rewrite cluster/kuberay/rayservice.yaml in place
    python -m cluster.rayservice --check    # exit 1 (and say so) when the manifest has drifted

Only the `serveConfigV2: |` block is rewritten, as text: the rest of the manifest (and its
comments) is the operator's, and a YAML round trip would drop those comments. The Serve config
is carried over as it is (a deep copy of `applications:` and the cluster-wide options Serve's
REST API accepts), never re-typed here, so whatever the production config says about scorers,
batching or autoscaling is what the cluster runs.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = ROOT / "serve_config.yaml"
MANIFEST = ROOT / "cluster" / "kuberay" / "rayservice.yaml"

# Top-level keys of Ray Serve's deploy schema (ServeDeploySchema) that a RayService passes on.
# Anything else in serve_config.yaml is refused rather than silently left behind.
SERVE_KEYS = (
    "proxy_location",
    "http_options",
    "grpc_options",
    "controller_options",
    "logging_config",
    "tracing_config",
    "target_capacity",
    "applications",
)
HEADER = (
    "# GENERATED from serve_config.yaml by `python -m cluster.rayservice`: edit that file and rerun;\n"
    "# `python -m cluster.rayservice --check` (and make test) fail when this block has drifted.\n"
)
_BLOCK_KEY = re.compile(r"^(?P<indent>[ ]*)serveConfigV2:[ ]*\|[-+]?[ ]*$")


class DriftError(RuntimeError):
    """The manifest's serveConfigV2 is not what serve_config.yaml generates."""


def serve_config_v2(serve_config: dict) -> dict:
    """The Serve config a RayService should run: serve_config.yaml's own keys, copied."""
    unknown = sorted(set(serve_config) - set(SERVE_KEYS))
    if unknown:
        raise ValueError(f"serve_config.yaml has keys a RayService cannot pass to Serve: {unknown}")
    if not serve_config.get("applications"):
        raise ValueError("serve_config.yaml has no applications")
    return {key: copy.deepcopy(serve_config[key]) for key in SERVE_KEYS if key in serve_config}


def render_block(config: dict, indent: str) -> str:
    """The block scalar's lines: a header comment (Serve's YAML parser ignores it) and the config."""
    body = HEADER + yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=1000, allow_unicode=True)
    return "".join(f"{indent}{line}\n" if line else "\n" for line in body.splitlines())


def update_manifest(manifest: str, serve_config: dict) -> str:
    """The manifest text with its `serveConfigV2: |` block replaced by the generated one."""
    lines = manifest.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _BLOCK_KEY.match(line.rstrip("\n"))]
    if len(starts) != 1:
        raise ValueError(f"expected exactly one 'serveConfigV2: |' line in the manifest, found {len(starts)}")
    start = starts[0]
    key_indent = len(_BLOCK_KEY.match(lines[start].rstrip("\n")).group("indent"))
    end = start + 1
    while end < len(lines):  # the block runs until a non-blank line indented no deeper than its key
        text = lines[end].rstrip("\n")
        if text.strip() and len(text) - len(text.lstrip(" ")) <= key_indent:
            break
        end += 1
    block = render_block(serve_config_v2(serve_config), " " * (key_indent + 2))
    return "".join(lines[: start + 1]) + block + "".join(lines[end:])


def generated_matches(manifest_path: Path = MANIFEST, serve_config_path: Path = SERVE_CONFIG) -> bool:
    serve_config = yaml.safe_load(serve_config_path.read_text())
    text = manifest_path.read_text()
    return update_manifest(text, serve_config) == text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.rayservice", description=__doc__.splitlines()[0])
    parser.add_argument("--serve-config", type=Path, default=SERVE_CONFIG)
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when the manifest has drifted")
    opts = parser.parse_args(argv)
    serve_config = yaml.safe_load(opts.serve_config.read_text())
    current = opts.manifest.read_text()
    wanted = update_manifest(current, serve_config)
    if opts.check:
        if wanted != current:
            print(f"{opts.manifest}: serveConfigV2 differs from {opts.serve_config}; "
                  "run `python -m cluster.rayservice` and commit the result", file=sys.stderr)
            return 1
        print(f"{opts.manifest}: serveConfigV2 matches {opts.serve_config}")
        return 0
    if wanted != current:
        opts.manifest.write_text(wanted)
        print(f"{opts.manifest}: serveConfigV2 rewritten from {opts.serve_config}")
    else:
        print(f"{opts.manifest}: already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
