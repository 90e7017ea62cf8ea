"""Slow, opt-in (PSEDIT_SLOW=1 and COMFYUI_PATH): ComfyUI's server runs the edit workflow's API-format twin on a
randomly initialised full-size SD1.5 checkpoint at 64x64, with PSEdit installed, and writes a finite image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tiny
from PIL import Image

if os.environ.get("PSEDIT_SLOW") != "1":
    pytest.skip("slow server run: set PSEDIT_SLOW=1 (and COMFYUI_PATH) to run it", allow_module_level=True)
try:
    tiny.comfy_path()
except tiny.ComfyUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

from comfy_server import Server  # noqa: E402
from validate import ui_to_api  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    if not (tiny.WEIGHTS / "taesd" / "taesd_decoder.safetensors").is_file():
        pytest.skip("needs ../shared/weights (TAESD, LPIPS trunks)")
    path = tmp_path_factory.mktemp("ckpt") / "random_sd15.safetensors"
    tiny.random_sd15_checkpoint(path)
    return path


def test_edit_workflow_runs_on_server(tmp_path, checkpoint):
    server = Server(base=tmp_path / "comfy").prepare()
    models = server.base / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / checkpoint.name).symlink_to(checkpoint)
    for name, folder in (("vae_approx", "taesd"), ("lpips", "lpips")):
        (models / name).mkdir()
        for f in (tiny.WEIGHTS / folder).iterdir():
            (models / name / f.name).symlink_to(f)
    Image.fromarray((tiny.photo(64)[0].numpy() * 255).astype(np.uint8)).save(server.base / "input" / "photo.png")

    repo = tiny.REPO
    object_info = json.loads((repo / "tests" / "data" / "object_info.json").read_text())
    workflow = json.loads((repo / "example_workflows" / "psedit_edit_sd15.json").read_text())
    prompt = ui_to_api(workflow, object_info)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = "random_sd15.safetensors"
        elif node["class_type"] == "LoadImage":
            inputs["image"] = "photo.png"
        elif node["class_type"] == "BasicScheduler":
            inputs["steps"] = 4
        elif node["class_type"] == "PSEditNullTextInversion":
            inputs["inner_iterations"] = 2

    server.start()
    try:
        prompt_id = server.post("/prompt", {"prompt": prompt})["prompt_id"]
        deadline = time.time() + 1500
        while time.time() < deadline:
            history = server.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                break
            time.sleep(2)
        record = history.get(prompt_id, {})
        status = record.get("status", {}).get("status_str")
        assert status == "success", json.dumps(record)[-3000:] + server.log()[-3000:]
    finally:
        server.stop()
    files = sorted((server.base / "output").glob("psedit_edit_*.png"))
    assert files, server.log()[-3000:]
    image = np.asarray(Image.open(files[-1])).astype(np.float32)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 1.0


def test_psedit_edit_command_on_a_checkpoint(tmp_path, checkpoint):
    """The console command loads a real checkpoint file through ComfyUI and writes the edit."""
    photo = tmp_path / "photo.png"
    Image.fromarray((tiny.photo(64)[0].numpy() * 255).astype(np.uint8)).save(photo)
    out = tmp_path / "edited.png"
    cmd = [sys.executable, "-m", "psedit_cli", "edit", "--comfyui", str(tiny.comfy_path()), "--checkpoint",
           str(checkpoint), "--image", str(photo), "--source", "a photo of an astronaut", "--edit",
           "a photo of a robot", "--out", str(out), "--steps", "3", "--inner-iterations", "1", "--decoder", "vae",
           "--lpips-dir", str(tiny.WEIGHTS / "lpips")]
    result = subprocess.run(cmd, cwd=tiny.REPO, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    image = np.asarray(Image.open(out)).astype(np.float32)
    assert image.shape == (64, 64, 3) and image.std() > 1.0
