"""Slow, opt-in (PSEDIT_SLOW=1 and COMFYUI_PATH): ComfyUI's server runs the edit, Prompt-to-Prompt and
Plug-and-Play workflows' API-format twins on a randomly initialised full-size SD1.5 checkpoint (its real CLIP
tokenizer) at about 100x100 pixels, with PSEdit installed, and writes a finite image.

The checkpoint (UNet + CLIP-L + SD VAE, random weights, fp32, about 4 GB) is built with ComfyUI's own classes and saved
with ``comfy.sd.save_checkpoint`` in a temporary folder; the real TAESD decoder and LPIPS trunk come from
../shared/weights through an extra_model_paths.yaml, as a user would register them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error

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
from ui_to_api import ui_to_api  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    if not (tiny.WEIGHTS / "taesd" / "taesd_decoder.safetensors").is_file():
        pytest.skip("needs ../shared/weights (TAESD, LPIPS trunks)")
    path = tmp_path_factory.mktemp("ckpt") / "random_sd15.safetensors"
    tiny.random_sd15_checkpoint(path)
    yield path
    path.unlink(missing_ok=True)  # 4 GB: pytest keeps its temporary folders around


STEPS, INNER_ITERATIONS, TIMEOUT_S = 4, 2, 1500
# The workflow scales the photo to SD1.5's 512x512 area; here to the node's minimum, 0.01 "megapixels" (10485
# pixels, about 102x102), so a 256x192 "phone photo" becomes 118x89, which VAE Encode crops to 112x88.
MEGAPIXELS, PHOTO_SIZE, EDIT_SHAPE = 0.01, (256, 192), (88, 112, 3)
SCALED_SHAPE = (89, 118, 3)  # the scaled photo before VAE Encode's crop (ImageBatch scales the edits to it)


def api_prompt(name: str, ckpt_name: str, photo: str) -> dict:
    """The workflow ``name`` (an id of tools/make_workflows.py) as the frontend would POST it, with the files set and
    the run shortened."""
    workflow = tiny.workflow(name)
    prompt = ui_to_api(workflow, tiny.host_object_info())
    changes = {"CheckpointLoaderSimple": {"ckpt_name": ckpt_name}, "LoadImage": {"image": photo},
               "BasicScheduler": {"steps": STEPS}, "PSEditNullTextInversion": {"inner_iterations": INNER_ITERATIONS},
               "ImageScaleToTotalPixels": {"megapixels": MEGAPIXELS}}
    for node in prompt.values():
        for name, value in changes.get(node["class_type"], {}).items():
            assert name in node["inputs"], (node["class_type"], name)
            node["inputs"][name] = value
    assert {n["class_type"] for n in prompt.values()} >= {"CheckpointLoaderSimple", "LoadImage", "BasicScheduler",
                                                          "ImageScaleToTotalPixels", "PSEditDDIMInvert", "SaveImage"}
    return prompt


@pytest.mark.parametrize("name,prefixes", [
    ("psedit_edit_sd15", {"psedit_edit_"}), ("psedit_masked_edit_sd15", {"psedit_masked_edit_"}),
    ("psedit_ablation_sd15", {"psedit_nulltext_", "psedit_textopt_", "psedit_perceptual_", "psedit_ablation_"}),
    ("psedit_p2p_sd15", {"psedit_p2p_"}), ("psedit_pnp_sd15", {"psedit_pnp_"})])
def test_edit_workflow_runs_on_server(tmp_path, checkpoint, name, prefixes):
    server = Server(base=tmp_path / "comfy").prepare()
    checkpoints = server.base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / checkpoint.name).symlink_to(checkpoint)
    server.extra_model_paths({"vae_approx": tiny.WEIGHTS / "taesd", "lpips": tiny.WEIGHTS / "lpips"})
    photo = Image.fromarray((tiny.photo(256)[0].numpy() * 255).astype(np.uint8)).resize(PHOTO_SIZE)
    photo.save(server.base / "input" / "photo.png")
    prompt = api_prompt(name, checkpoint.name, "photo.png")

    server.start()
    try:
        try:
            prompt_id = server.post("/prompt", {"prompt": prompt})["prompt_id"]
        except urllib.error.HTTPError as exc:
            pytest.fail(f"ComfyUI rejected {name}: {exc.read().decode()[:3000]}")
        deadline, history = time.time() + TIMEOUT_S, {}
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
    saved = [img for out in record["outputs"].values() for img in out.get("images", []) if img.get("type") == "output"]
    assert {img["filename"].rsplit("_", 2)[0] + "_" for img in saved} == prefixes, saved
    for img in saved:  # each edit at the photo's cropped size; the ablation's comparison batch at the scaled photo's
        path = server.base / "output" / img.get("subfolder", "") / img["filename"]
        assert path.is_file(), server.log()[-3000:]
        image = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)
        want = SCALED_SHAPE if img["filename"].startswith("psedit_ablation_") else EDIT_SHAPE
        assert image.shape == want, (img, image.shape)
        assert np.isfinite(image).all() and image.std() > 1.0, f"{img['filename']} came out constant"
    log = server.log()
    assert "Adding extra search path lpips" in log and "Adding extra search path vae_approx" in log


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
