"""Host tier: the fixtures themselves. Tiny models are fully initialised and give finite, nonzero predictions; the
stock SamplerCustomAdvanced + CFGGuider samples them under ``torch.inference_mode()`` as ComfyUI's executor would;
TAESD round-trips the photo."""

from __future__ import annotations

import pytest
import torch
from _comfy_env import family_of, run_node

MODELS = ["tiny_sd15", "tiny_sd15_v", "tiny_sdxl"]


@pytest.fixture(params=MODELS)
def model(request):
    return request.getfixturevalue(request.param)


def test_every_parameter_initialised(model):
    """ComfyUI's layers start as torch.empty: every parameter must be overwritten (finite, not all zero).
    Transformer norms sit at identity; ResBlock GroupNorms keep small random gains on purpose (see tiny.init_random)."""
    norms = dict(model.model.named_modules())
    identity_norms = {name for name, m in norms.items() if isinstance(m, torch.nn.LayerNorm)
                      or (isinstance(m, torch.nn.GroupNorm) and name.endswith(".norm"))}
    assert identity_norms
    with torch.inference_mode():  # the weights are inference tensors, as ComfyUI's loaders make them
        for name, p in model.model.named_parameters():
            assert torch.isfinite(p).all(), name
            module, kind = name.rsplit(".", 1)
            if module in identity_norms:
                assert torch.equal(p, torch.ones_like(p) if kind == "weight" else torch.zeros_like(p)), name
            else:
                assert p.abs().max() > 0, name


def test_model_identity(tiny_sd15, tiny_sd15_v, tiny_sdxl):
    import comfy.model_sampling

    assert family_of(tiny_sd15) == "sd15" and family_of(tiny_sdxl) == "sdxl"
    assert isinstance(tiny_sd15.get_model_object("model_sampling"), comfy.model_sampling.EPS)
    assert not isinstance(tiny_sd15.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)
    assert isinstance(tiny_sd15_v.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)
    assert tiny_sd15.model.latent_format.scale_factor == pytest.approx(0.18215)
    assert tiny_sdxl.model.latent_format.scale_factor == pytest.approx(0.13025)
    assert tiny_sd15 is not tiny_sd15_v and tiny_sd15.model is not tiny_sd15_v.model


def test_prediction_is_finite_nonzero_and_conditioned(model, make_cond):
    cond_a, cond_b = make_cond(model, 0), make_cond(model, 1)
    assert torch.equal(make_cond(model, 0)[0][0], cond_a[0][0])  # deterministic
    width = 2048 if family_of(model) == "sdxl" else 768
    assert cond_a[0][0].shape == (1, 77, width)
    if family_of(model) == "sdxl":
        assert cond_a[0][1]["pooled_output"].shape == (1, 1280)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.tensor([3.0])

    def denoised(cond):
        adm = model.model.encode_adm(pooled_output=cond[0][1].get("pooled_output"), width=64, height=64)
        with torch.inference_mode():
            return model.model.apply_model(x, sigma, c_crossattn=cond[0][0], y=adm)

    a, b = denoised(cond_a), denoised(cond_b)
    assert a.shape == x.shape and torch.isfinite(a).all()
    eps = (x - a) / sigma
    assert eps.std() > 1e-2
    assert (a - b).abs().max() > 1e-4  # the text conditioning reaches the output


def sample(model, positive, negative, steps=10, cfg=5.0, size=64, seed=0):
    import comfy_extras.nodes_custom_sampler as ncs

    import nodes

    with torch.inference_mode():  # as execution.py runs every node
        (latent,) = run_node(nodes.EmptyLatentImage, width=size, height=size, batch_size=1)
        (noise,) = run_node(ncs.RandomNoise, noise_seed=seed)
        (guider,) = run_node(ncs.CFGGuider, model=model, positive=positive, negative=negative, cfg=cfg)
        (sampler,) = run_node(ncs.KSamplerSelect, sampler_name="euler")
        (sigmas,) = run_node(ncs.BasicScheduler, model=model, scheduler="normal", steps=steps, denoise=1.0)
        out, denoised = run_node(ncs.SamplerCustomAdvanced, noise=noise, guider=guider, sampler=sampler,
                                 sigmas=sigmas, latent_image=latent)
    return out["samples"], denoised["samples"]


def test_sampler_custom_advanced_with_cfg_guider(model, make_cond):
    samples, denoised = sample(model, make_cond(model, 1), make_cond(model, 0))
    assert samples.shape == (1, 4, 8, 8) and denoised.shape == (1, 4, 8, 8)
    assert torch.isfinite(samples).all() and samples.abs().max() > 0
    again, _ = sample(model, make_cond(model, 1), make_cond(model, 0))
    assert torch.equal(samples, again)  # deterministic end to end


@pytest.mark.parametrize(("vae_fixture", "scale"), [("taesd_vae", 0.18215), ("taesdxl_vae", 0.13025)])
def test_taesd_round_trip(request, vae_fixture, scale, photo):
    vae = request.getfixturevalue(vae_fixture)
    assert float(vae.first_stage_model.vae_scale.detach()) == pytest.approx(scale)
    assert photo.shape == (1, 64, 64, 3) and 0 <= photo.min() and photo.max() <= 1
    with torch.inference_mode():
        latent = vae.encode(photo)
        image = vae.decode(latent)
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()
    assert image.shape[-3:] == (64, 64, 3)
    err = (image.reshape(photo.shape) - photo).abs().mean()
    flat = (photo.mean(dim=(1, 2), keepdim=True) - photo).abs().mean()  # a flat image of the mean colour
    assert err < 0.6 * flat  # TAESD is lossy at an 8x8 latent (err ~0.11), but it is the photo


def test_photo_sizes(photo_at):
    big = photo_at(128, batch=2)
    assert big.shape == (2, 128, 128, 3) and big.dtype == torch.float32
    big.zero_()  # callers get a copy
    assert photo_at(128, batch=2).max() > 0.5
