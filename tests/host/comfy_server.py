"""Start a real ComfyUI server (COMFYUI_PATH) on loopback with this repository installed as a custom node pack.

Used by the host server test and ``tools/snapshot_object_info.py``. The server gets its own base directory
(custom_nodes/psedit -> this repo, models/, input/, output/), so it never touches a user's ComfyUI folders and loads no
other custom node pack (a ``custom_nodes:`` entry in an extra_model_paths.yaml would add ours to ComfyUI's own
custom_nodes/, including any PSEdit copy installed there). Loopback only, offline (--disable-api-nodes), no browser;
its database lives in the base directory too (ComfyUI's default is inside the checkout; an in-memory one logs
SQLite thread errors).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tiny import REPO, comfy_path

PACK_FOLDER = "psedit"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path | None = None, python: str = sys.executable, timeout: float = 180,
                 extra_args: tuple[str, ...] = ()):
        self.root = comfy_path()
        self.extra_args = list(extra_args)
        self.base = Path(base or tempfile.mkdtemp(prefix="psedit-comfy-"))
        self.port = free_port()
        self.python, self.timeout = python, timeout
        self.log_path = self.base / "server.log"
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def prepare(self) -> Server:
        for d in ("custom_nodes", "models", "input", "output", "temp", "user"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_FOLDER
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        return self

    def extra_model_paths(self, folders: dict[str, Path]) -> Server:
        """Register model folders (``{"vae_approx": path, ...}``) the way a user's extra_model_paths.yaml does."""
        self.base.mkdir(parents=True, exist_ok=True)
        config = self.base / "extra_model_paths.yaml"
        config.write_text("psedit_test:\n" + "".join(f"  {k}: {json.dumps(str(v))}\n" for k, v in folders.items()))
        self.extra_args += ["--extra-model-paths-config", str(config)]
        return self

    def start(self) -> Server:
        self.prepare()
        cmd = [self.python, str(self.root / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", "--disable-api-nodes",
               "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}", *self.extra_args]
        log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._log = log
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {self.timeout}s:\n{self.log()[-3000:]}")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, remove: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_log", None):
            self._log.close()
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
