"""Peak memory and time of normalising one 40-megapixel upload, before and after the cheap
decode. Each measurement runs in a fresh subprocess: the peak RSS of the call (Linux
VmHWM, reset just before it through /proc/self/clear_refs) minus the RSS before it, so Pillow's
C allocations count (tracemalloc misses them; ru_maxrss carries the parent's peak across exec).

    .venv/bin/python -m benchmarks.upload_decode [--before path/to/old/uploads.py]

`--before` takes a copy of the old module (e.g. `git show 19b5182:deployments/uploads.py >
/tmp/old_uploads.py`), whose `normalize_image` returned PNG bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 8000, 5000  # 40.0 MP, the default max_pixels

_CHILD = r"""
import gc, importlib.util, json, sys, time
from pathlib import Path
module_path, image_path = sys.argv[1], sys.argv[2]
if module_path == "-":
    from deployments import uploads
else:
    spec = importlib.util.spec_from_file_location("old_uploads", module_path)
    uploads = importlib.util.module_from_spec(spec); spec.loader.exec_module(uploads)
data = Path(image_path).read_bytes()
limits = uploads.UploadLimits(max_bytes=64 * 2**20)
def status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
gc.collect()
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
before = status_kib("VmRSS")
start = time.perf_counter()
result = uploads.normalize_image(data, limits)
seconds = time.perf_counter() - start
peak = status_kib("VmHWM")
png = result if isinstance(result, bytes) else result.png
print(json.dumps({"peak_mib": (peak - before) / 1024, "seconds": seconds, "stored_bytes": len(png)}))
"""


def make_images(folder: Path) -> dict[str, Path]:
    """A photo-like 40 MP picture: smooth gradients plus mild grain (JPEG quality 90); the PNG
    has no grain so it stays under the upload limit, as a 40 MP PNG must to be accepted at all."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    base = np.stack([x / WIDTH * 255, y / HEIGHT * 255, (x + y) / (WIDTH + HEIGHT) * 255], axis=-1)
    grain = np.random.default_rng(0).normal(0, 6, base.shape).astype(np.float32)
    paths = {"jpeg": folder / "40mp.jpg", "png": folder / "40mp.png"}
    Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)).save(paths["jpeg"], quality=90)
    Image.fromarray(base.astype(np.uint8)).save(paths["png"], optimize=False)
    return paths


def measure(module: str, image: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, module, str(image)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="path of the old uploads module")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for kind, path in make_images(Path(folder)).items():
            row = {"image": kind, "file_mib": round(path.stat().st_size / 2**20, 1)}
            for label, module in (("before", args.before), ("after", "-")):
                if module:
                    row[label] = {k: round(v, 2) for k, v in measure(module, path).items()}
            print(json.dumps(row))


if __name__ == "__main__":
    main()
