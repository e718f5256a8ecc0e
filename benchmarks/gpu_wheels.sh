#!/usr/bin/env bash
# Wheels for running benchmarks/gpu_scoring.py on a lent GPU machine (docs/gpu_benchmark.md).
# That machine reaches no package index and its image has torch, transformers and numpy but not
# ray, open_clip, fastapi, pydantic...: this downloads (here, where PyPI is reachable) the
# CPython 3.12 wheels of every distribution sceneref needs that the image lacks, at the versions
# tested in .venv, into two folders of under 60 MiB each (a device call carries at most 64 MiB;
# ray's wheel alone is larger, so it travels in two pieces that gpu_device.sh joins).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpuwheels}
# Distributions in the GPU image ('cuda', as read on 2026-11-17: .library/device/KINDS.md).
IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
charset-normalizer click cloudpickle cuda-bindings cuda-core cuda-pathfinder cuda-toolkit filelock frozenlist fsspec
grpcio h11 hf-xet httpcore httpx huggingface-hub idna jinja2 markdown-it-py markupsafe mdurl mpmath msgpack multidict
networkx numpy nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx packaging pillow prometheus-client propcache protobuf psutil pygments
python-dateutil pyyaml regex requests rich safetensors setuptools shellingham six sympy timm tokenizers torch
torchvision tqdm transformers triton typer typing-extensions urllib3 uvloop wrapt yarl"
.venv/bin/python - "$IMAGE" > /tmp/gpuwheels.txt <<'PY'
import re, sys
from importlib.metadata import PackageNotFoundError, distribution
from packaging.requirements import Requirement

norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
image, seen = set(sys.argv[1].split()), {}
env = {"python_version": "3.12", "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}

def walk(name, extras=()):
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        return
    key = norm(dist.metadata["Name"])
    if key in seen and not extras:
        return
    seen[key] = dist.version
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
            walk(req.name, tuple(req.extras))

walk("sceneref")
for name, version in sorted(seen.items()):
    if name not in image and name != "sceneref":
        print(f"{name}=={version}")
PY
rm -rf "$DEST" && mkdir -p "$DEST/all"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$DEST/all" -r /tmp/gpuwheels.txt 2> >(grep -v "is ignored" >&2)
ray=$(ls "$DEST"/all/ray-*.whl)
basename "$ray" > "$DEST/all/ray.name"
split -b 40M "$ray" "$DEST/all/ray.part-" && rm "$ray"
# Pack into folders 1, 2, ... of at most 55 MiB, largest files first.
python3 - "$DEST" <<'PY'
import sys
from pathlib import Path

root = Path(sys.argv[1])
bins: list[list] = []
for f in sorted((root / "all").iterdir(), key=lambda f: -f.stat().st_size):
    size = f.stat().st_size
    fit = next((b for b in bins if b[0] + size <= 55 * 2**20), None)
    if fit is None:
        fit = [0]
        bins.append(fit)
    fit[0] += size
    fit.append(f)
for i, (total, *files) in enumerate(bins, 1):
    (root / str(i)).mkdir()
    for f in files:
        f.rename(root / str(i) / f.name)
    print(f"{root}/{i}: {len(files)} files, {total / 2**20:.0f} MiB")
(root / "all").rmdir()
PY
grep -qx "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
