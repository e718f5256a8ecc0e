"""`serve run` on the offline config, as a user starts it, and a generation through it.

The config file is used as shipped except for the HTTP port (a free one, so the test never
collides with something on 8000). RAY_ADDRESS=local makes `serve run` start its own cluster
even while the session's shared test cluster is up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serve.conftest import ENV, free_port, wait_healthy

pytestmark = pytest.mark.serve
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.timeout(1200)  # a cold `serve run` builds and loads five tiny models: slow on a loaded machine
def test_serve_run_offline_config(tmp_path):
    config = yaml.safe_load((ROOT / "serve_config.offline.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["public_base_url"] = f"http://127.0.0.1:{port}"  # links name the port we use
    (tmp_path / "serve_config.offline.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, **ENV, "RAY_ADDRESS": "local"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "serve"), "run", "serve_config.offline.yaml"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, timeout_s=900)
        token = subprocess.run(
            [str(BIN / "sceneref"), "token", "--sub", "newcomer"], env=env, check=True, capture_output=True, text=True
        ).stdout.strip()
        headers = {"Authorization": f"Bearer {token}"}
        body = {"prompt": "Artisan coffee that starts your morning right", "target_duration": 9,
                "advanced_image_num_variations": 2, "advanced_image_max_enhancement_iterations": 2}
        reply = httpx.post(f"{base}/api/generate", json=body, headers=headers, timeout=30)
        assert reply.status_code == 202, reply.text
        status_url = reply.json()["status_url"]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status = httpx.get(status_url, headers=headers, timeout=10).json()
            if status["status"] in ("completed", "failed"):
                break
            time.sleep(1)
        assert status["status"] == "completed", status
        assert status["offline"] is True and len(status["storyboard_plan"]["scenes"]) == 3
        # Relative paths of the config land where `serve run` was started.
        assert (tmp_path / "output" / "serve" / "sceneref.db").is_file()
        assert (tmp_path / "output" / "offline-models").is_dir()
        image = httpx.get(status["storyboard_plan"]["scenes"][2]["reference_image_url"], timeout=10)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
