"""Host tier: the inversion path on Qwen-Image (flow matching, real CFG, Wan 2.1 latents ``[B, 16, 1, h, w]``), the way
ComfyUI runs it: PSEdit DDIM Invert -> PSEdit Inverted Noise -> PSEdit Triple Guider (optionally inside Perceptual
Guidance, decoder 'vae') -> the stock SamplerCustomAdvanced, on a tiny Qwen-Image built from ComfyUI's own classes
under inference mode. Its FlowEdit path and the estimated Edit Mask on it are in test_flowedit.py.

Measured (16x16 latents of RMS 1, 10-step 'simple' schedule, same on ComfyUI 0.3.64 and 0.33.0): the round trip
through euler from the Inverted Noise, relative error, plain / refine 3 / refine 8: start convention 0.35 / 8.2e-3 /
1.2e-4, target 0.28 / 7.3e-3 / 1.2e-4 (this random one-block model moves its prediction fast with the latent, as the
tiny Flux does: SD3 plain 1.6e-2); DisableNoise with the inverted LATENT 1.75 (a zero start).
"""

from __future__ import annotations

import pytest
import tiny
import torch

try:
    tiny.load_pack()
except tiny.ComfyUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

import comfy_extras.nodes_custom_sampler as ncs  # noqa: E402
from psedit_pack.nodes import _comfy  # noqa: E402
from psedit_pack.nodes.flux import FluxGuiderNode  # noqa: E402
from psedit_pack.nodes.guidance import PerceptualGuidanceNode, TripleGuiderNode  # noqa: E402
from psedit_pack.nodes.inversion import DDIMInvert, InvertedNoiseNode  # noqa: E402
from psedit_pack.nodes.nulltext import NullTextInversion  # noqa: E402
from psedit_pack.nodes.p2p import AttentionControlNode  # noqa: E402
from psedit_pack.nodes.pnp import FeatureInjectionNode  # noqa: E402
from test_flowedit import SIZE, rel_err, sample, sigmas_for  # noqa: E402
from test_flowedit import photo_latent as flow_photo_latent  # noqa: E402

cfg_guider = tiny.cfg_guider


@pytest.fixture(scope="module")
def qwen():
    return tiny.qwen_world()


def photo_latent(seed=0, size=SIZE):
    return flow_photo_latent("qwen", seed, size)


def invert(model, latent, sigmas, source, refine=0, convention="start"):
    with torch.inference_mode():
        inverted, payload = DDIMInvert.execute(model, latent, sigmas, source, 1.0, refine, convention=convention)
        return inverted, payload, InvertedNoiseNode.execute(payload)[0]


def test_invert_then_sample_reconstructs_on_qwen(qwen):
    """DDIM Invert on 5-D latents: the stock sampler from the Inverted Noise returns the photo's latent, closer with
    each refinement; DisableNoise with the inverted LATENT starts from zeros (at sigma 1), as on SD3 and Flux."""
    model, conds = qwen
    latent = photo_latent(0)
    original = latent["samples"].clone()
    sigmas = sigmas_for(model)
    assert float(sigmas[0]) == 1.0
    errors = {}
    for convention in ("start", "target"):
        for refine in (0, 3, 8):
            inverted, _, noise = invert(model, latent, sigmas, conds["source"], refine, convention)
            assert inverted["samples"].shape == original.shape
            errors[convention, refine] = rel_err(sample(cfg_guider(model, conds["source"], conds["null"], 1.0),
                                                        inverted, sigmas, noise), original)
    assert torch.equal(latent["samples"], original)  # input untouched
    for convention in ("start", "target"):
        plain, three, eight = (errors[convention, r] for r in (0, 3, 8))
        assert eight < 1e-3 and eight < three / 10 and three < plain / 10, errors
    disabled = sample(cfg_guider(model, conds["source"], conds["null"], 1.0), inverted, sigmas)
    assert rel_err(disabled, original) > 0.5


def test_inversion_and_mask_on_a_bf16_qwen():
    """Qwen-Image runs in bf16 (ComfyUI's choice for it on most GPUs; it has no fp16): the inversion, built under
    inference mode as ComfyUI builds it, still round-trips and the estimated mask still finds a region. Measured,
    ComfyUI 0.33 / 0.3.64: refine 3 9.4e-3 / 8.8e-3 (fp32 8.2e-3); the mask covers 0.39 / 0.40 of the image."""
    from psedit_pack.nodes.masks import EditMask

    model, conds = tiny.qwen_world(torch.bfloat16)
    assert next(model.model.parameters()).dtype == torch.bfloat16
    latent, sigmas = photo_latent(0), sigmas_for(model)
    inverted, payload, noise = invert(model, latent, sigmas, conds["source"], 3)
    out = sample(cfg_guider(model, conds["source"], conds["null"], 1.0), inverted, sigmas, noise)
    assert out.dtype == torch.float32 and rel_err(out, latent["samples"]) < 0.02
    with torch.inference_mode():
        mask = EditMask.execute(model, payload, conds["source"], conds["edit"], 0.5, 1.0, 0.5, False)[0]
    assert 0.1 < mask.mean() < 0.9


def test_inverted_noise_works_with_any_latent_image_on_qwen(qwen):
    """The inverted latent, the photo's latent or an empty 5-D latent, at sigma 1 or below it: the sampler starts at
    the inverted latent each time. A latent of another shape is refused, naming the fix."""
    model, conds = qwen
    latent = photo_latent(2)
    for sigmas in (sigmas_for(model), sigmas_for(model, 12)[2:]):
        inverted, _, noise = invert(model, latent, sigmas, conds["source"], 8)
        for lat in (inverted, latent, {"samples": torch.zeros_like(latent["samples"])}):
            out = sample(cfg_guider(model, conds["source"], conds["null"], 1.0), lat, sigmas, noise)
            assert rel_err(out, latent["samples"]) < 1e-3
    with pytest.raises(ValueError, match="connect DDIM Invert's inverted LATENT"):
        noise.generate_noise(photo_latent(3, size=8))


def test_triple_guider_on_qwen_equals_dual_cfg_and_refuses_a_zero_start(qwen):
    """Qwen-Image has real CFG, as SD3: the Triple Guider's sum is DualCFGGuider's (edit, source, null at beta,
    gamma), beta 0 is CFG on the source caption, and DisableNoise's zero start is refused naming Inverted Noise."""
    model, conds = qwen
    latent, sigmas = photo_latent(5), sigmas_for(model)
    inverted, _, noise = invert(model, latent, sigmas, conds["source"], 3)
    with torch.inference_mode():
        triple = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 2.5, 1.5)[0]
        dual = ncs.DualCFGGuider().get_guider(model, conds["edit"], conds["source"], conds["null"], 1.5, 2.5,
                                              "regular")[0]
        zero_beta = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 2.5, 0.0)[0]
    edited = sample(triple, inverted, sigmas, noise)
    assert rel_err(edited, sample(dual, inverted, sigmas, noise)) < 1e-5
    source_only = sample(cfg_guider(model, conds["source"], conds["null"], 2.5), inverted, sigmas, noise)
    assert rel_err(sample(zero_beta, inverted, sigmas, noise), source_only) < 1e-5
    assert rel_err(edited, source_only) > 1e-2  # the edit caption acts
    with pytest.raises(ValueError, match="Connect PSEdit Inverted Noise"):
        sample(triple, inverted, sigmas)


def test_perceptual_guidance_lowers_lpips_on_qwen_inversion_path(qwen):
    """Perceptual Guidance (decoder 'vae', the random Wan 2.1 VAE) around the Triple Guider on Qwen-Image: LPIPS of
    the edit to the photo falls at equal settings. Measured (64 px, gamma 4, beta 3, step 'plain' 0.003, target
    'latent'): 0.0368 -> 0.0189 on ComfyUI 0.33 (VAE width 8), 0.0243 -> 0.0170 on 0.3.64 (width 96)."""
    from test_flowedit import QWEN_PLAIN_STRENGTH, alex_lpips, vae_decode

    if not (tiny.WEIGHTS / "lpips" / "alexnet_features.pth").is_file():
        pytest.skip(f"needs the real LPIPS trunks in {tiny.WEIGHTS / 'lpips'}")
    tiny.register_shared_weights()
    model, conds = qwen
    vae = tiny.random_wan21_vae(seed=1)
    latent, sigmas = photo_latent(8, size=8), sigmas_for(model)
    image = vae_decode(model, vae, latent["samples"]).movedim(1, -1)
    inverted, _, noise = invert(model, latent, sigmas, conds["source"], 3)
    with torch.inference_mode():
        triple = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 4.0, 3.0)[0]
        guided = PerceptualGuidanceNode.execute(triple, vae, image, QWEN_PLAIN_STRENGTH, "alex", "x0", "vae", "plain",
                                                target="latent")[0]
    lp = {k: alex_lpips(vae_decode(model, vae, sample(g, inverted, sigmas, noise)), image)
          for k, g in (("plain", triple), ("guided", guided))}
    assert lp["guided"] < 0.8 * lp["plain"], lp


def test_nodes_not_run_on_qwen_say_which_do(qwen):
    """Null-text inversion, Prompt-to-Prompt, Plug-and-Play (UNet attention) and the Flux guider stop on Qwen-Image
    with a message that names the PSEdit nodes that run on it."""
    model, conds = qwen
    cond = conds["source"]
    _, payload, _ = invert(model, photo_latent(1, size=8), sigmas_for(model, 4), cond)
    calls = {
        "PSEdit Null-Text Inversion": lambda: NullTextInversion.execute(model, payload, conds["null"], cond, 2.5,
                                                                        "null-text", 2, 1e-5, 0.01),
        "PSEdit Flux Guider": lambda: FluxGuiderNode.execute(model, cond, conds["edit"], 3.5, 1.4),
        "PSEdit Attention Control": lambda: AttentionControlNode.execute(model, payload, None, "a", "b", "replace",
                                                                         0.0, 0.8, 0.0, 0.4),
        "PSEdit Feature Injection": lambda: FeatureInjectionNode.execute(model, payload, None, "a", 0.0, 0.8, 0.0, 0.5),
    }
    with torch.inference_mode():
        for name, call in calls.items():
            with pytest.raises(ValueError, match="not Qwen-Image; on Qwen-Image PSEdit runs PSEdit FlowEdit Guider, "
                                                 "DDIM Invert") as info:
                call()
            assert str(info.value).startswith(name), (name, str(info.value))
    assert _comfy.is_extra_flow_model(model)
