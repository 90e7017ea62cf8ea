"""Host-tier fixtures: a real ComfyUI from COMFYUI_PATH, tiny SD1.5/SDXL-architecture models built in code with
deterministic random weights (seeded ``torch.Generator``s, never the global seed), the real TAESD/TAESDXL from
``../shared/weights``, and a real photo. Everything that needs ComfyUI skips with a reason when it is absent.

Models are built once per session; the model fixtures hand each test its own ``ModelPatcher.clone()`` (shared
weights, private patches and model_options), so a test that patches its model leaks nothing into the next.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # host helpers: tiny.py, _comfy_env.py

import pytest  # noqa: E402
import tiny  # noqa: E402
from _comfy_env import conditioning_for, require_comfyui  # noqa: E402


@pytest.fixture(scope="session")
def comfyui() -> str:
    """The ComfyUI root, on ``sys.path`` and initialised (CPU unless CUDA is available); skips when absent."""
    return require_comfyui()


@pytest.fixture(scope="session")
def _tiny_models(comfyui):
    return {}


def _model(cache: dict, family: str, prediction: str):
    key = (family, prediction)
    if key not in cache:
        cache[key] = tiny.build_tiny(family, prediction)
    return cache[key].clone()


@pytest.fixture
def tiny_sd15(_tiny_models):
    """A ModelPatcher: tiny SD1.5-architecture UNet (context_dim 768), eps-prediction, random weights."""
    return _model(_tiny_models, "sd15", "eps")


@pytest.fixture
def tiny_sd15_v(_tiny_models):
    """The same weights as ``tiny_sd15`` with v-prediction (``ModelType.V_PREDICTION``)."""
    return _model(_tiny_models, "sd15", "v")


@pytest.fixture
def tiny_sdxl(_tiny_models):
    """A ModelPatcher: tiny SDXL-architecture UNet (context_dim 2048, adm_in_channels 2816), SDXL latent format."""
    return _model(_tiny_models, "sdxl", "eps")


@pytest.fixture(scope="session")
def make_cond(comfyui):
    """``make_cond(model, seed, tokens=77)`` -> CONDITIONING as CLIPTextEncode makes it for that model."""
    return conditioning_for


def _vae(family: str):
    vae = tiny.taesd_vae(family)
    if vae is None:
        pytest.skip(f"needs the real TAESD files in {tiny.WEIGHTS / 'taesd'} (../shared/weights beside the checkout)")
    return vae


@pytest.fixture(scope="session")
def taesd_vae(comfyui):
    """comfy.sd.VAE from the real TAESD (SD1.x latents, vae_scale 0.18215)."""
    return _vae("sd15")


@pytest.fixture(scope="session")
def taesdxl_vae(comfyui):
    """comfy.sd.VAE from the real TAESDXL (SDXL latents, vae_scale 0.13025)."""
    return _vae("sdxl")


@pytest.fixture(scope="session")
def _photos() -> dict:
    return {}


@pytest.fixture
def photo_at(_photos):
    """``photo_at(size, batch=1)`` -> scikit-image's astronaut as a ComfyUI IMAGE [B, size, size, 3] in [0, 1]."""

    def get(size: int, batch: int = 1):
        if (size, batch) not in _photos:
            _photos[size, batch] = tiny.photo(size, batch)
        return _photos[size, batch].clone()

    return get


@pytest.fixture
def photo(photo_at):
    """A real photo, 64x64: ComfyUI IMAGE [1, 64, 64, 3] float32 in [0, 1]."""
    return photo_at(64)
