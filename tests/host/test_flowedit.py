"""Host tier: PSEdit FlowEdit Guider / FlowEdit Flux Guider (issue 27) the way ComfyUI runs them: tiny SD3 (MMDiT-X),
Flux dev and Qwen-Image built from ComfyUI's own classes under inference mode, sampled by the stock
SamplerCustomAdvanced with DisableNoise, BasicScheduler and euler.

Measured (16x16 latents of RMS 1, 10-step 'simple' schedule, same on ComfyUI 0.3.64 and 0.33.0): the same caption at
the same guidance returns the photo's latent to 2.4e-7 (SD3, Flux) / 4.8e-7 (Qwen-Image) max abs, and a masked edit
keeps it outside the mask to 4.8e-7 (rounding of the start ``sigma n + (1 - sigma) x`` and of the latent scaling's
round trip); the guider equals the reference loop written below to 1.2e-7 - 1.4e-6 relative.
"""

from __future__ import annotations

import logging

import pytest
import tiny
import torch

try:
    tiny.load_pack()
except tiny.ComfyUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy_extras.nodes_custom_sampler as ncs  # noqa: E402
import folder_paths  # noqa: E402
from psedit_pack.nodes import _comfy  # noqa: E402
from psedit_pack.nodes.flowedit import FlowEditFluxGuiderNode, FlowEditGuiderNode  # noqa: E402
from psedit_pack.nodes.guidance import PerceptualGuidanceNode  # noqa: E402
from psedit_pack.nodes.inversion import DDIMInvert, InvertedNoiseNode  # noqa: E402
from psedit_pack.nodes.masks import EditMask  # noqa: E402

SIZE = 16  # latent side (128 px)
FAMILIES = ("sd3", "flux", "qwen")
SCALES = {"sd3": (3.5, 13.5), "flux": (1.5, 5.5), "qwen": (2.5, 5.0)}  # (source, edit) guidance per family


@pytest.fixture(scope="module", params=FAMILIES)
def flow(request):
    family = request.param
    if family == "qwen":
        model, conds = tiny.qwen_world()
    else:
        model = tiny.build_tiny_flow(family)
        conds = {n: tiny.flow_conditioning(family, s) for s, n in enumerate(("null", "source", "edit"))}
    return family, model, conds


@pytest.fixture(scope="module")
def sd3():
    return tiny.build_tiny_flow("sd3"), {n: tiny.flow_conditioning("sd3", s)
                                         for s, n in enumerate(("null", "source", "edit"))}


@pytest.fixture(scope="module")
def flux():
    return tiny.build_tiny_flow("flux"), {n: tiny.flow_conditioning("flux", s)
                                          for s, n in enumerate(("null", "source", "edit"))}


def photo_latent(family, seed=0, size=SIZE):
    shape = (1, 16, 1, size, size) if family == "qwen" else (1, 16, size, size)
    return {"samples": torch.randn(shape, generator=torch.Generator().manual_seed(seed))}


def sigmas_for(model, steps=10, scheduler="simple"):
    with torch.inference_mode():
        return ncs.BasicScheduler().get_sigmas(model, scheduler, steps, 1.0)[0]


def guider(family, model, conds, source=None, edit=None, src_g=None, tar_g=None, n_max=7, n_min=0, n_avg=1, seed=0,
           mask=None):
    s, t = SCALES[family]
    src_g, tar_g = s if src_g is None else src_g, t if tar_g is None else tar_g
    source = conds["source"] if source is None else source
    edit = conds["edit"] if edit is None else edit
    with torch.inference_mode():
        if family == "flux":
            return FlowEditFluxGuiderNode.execute(model, source, edit, src_g, tar_g, n_max, n_min, n_avg, seed,
                                                  mask=mask).result[0]
        return FlowEditGuiderNode.execute(model, conds["null"], source, edit, src_g, tar_g, n_max, n_min, n_avg, seed,
                                          mask=mask).result[0]


def sample(g, latent, sigmas, noise=None, sampler="euler"):
    with torch.inference_mode():
        return ncs.SamplerCustomAdvanced().sample(
            noise or ncs.Noise_EmptyNoise(), g, comfy.samplers.sampler_object(sampler), sigmas, latent
        )[0]["samples"]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# --- an independent implementation of the reference loop --------------------------------------------------------------

TIMESTEP = {"sd3": 1000.0, "flux": 1.0, "qwen": 1.0}  # what the networks take: SD3 t in [0, 1000], Flux/Qwen sigma


def reference_flowedit(family, model, conds, latent, sigmas, src_g, tar_g, n_max, n_min, n_avg, seed):
    """fallenshock/FlowEdit FlowEdit_utils.py (FlowEditSD3 / FlowEditFLUX) transcribed onto ComfyUI's networks,
    called directly (no guider, no sampler, no calc_cond_batch): velocities from ``diffusion_model``, CFG by hand
    (SD3 / Qwen: null + scale (caption - null); Flux: the caption at guidance = scale), the noise drawn as the
    guider documents (float32 CPU draws from one torch.Generator, n_avg per step, one at the hand-over)."""
    net = model.model.diffusion_model
    fmt = model.get_model_object("latent_format")
    x_src = fmt.process_in(latent["samples"].float())
    batch = x_src.shape[0]

    def net_v(x, t, cond, guidance=None):
        kw = {"context": cond[0][0]}
        if family != "qwen":
            kw["y"] = cond[0][1]["pooled_output"]
        if guidance is not None:
            kw["guidance"] = torch.full((batch,), guidance)
        return net(x, (t * TIMESTEP[family]).expand(batch), **kw)

    def v(x, t, cond, scale):
        if family == "flux":
            return net_v(x, t, cond, scale)
        uncond = net_v(x, t, conds["null"])
        return uncond + scale * (net_v(x, t, cond) - uncond)

    generator = torch.Generator().manual_seed(seed)

    def randn():
        return torch.randn(x_src.shape, generator=generator, dtype=torch.float32)

    T = sigmas.numel() - 1
    zt_edit, xt_tar = x_src.clone(), None
    with torch.inference_mode():
        for i in range(T):
            if T - i > n_max:
                continue
            t_i, t_im1 = sigmas[i], sigmas[i + 1]
            if T - i > n_min:
                v_delta = torch.zeros_like(x_src)
                for _ in range(n_avg):
                    fwd_noise = randn()
                    zt_src = (1 - t_i) * x_src + t_i * fwd_noise
                    zt_tar = zt_edit + zt_src - x_src
                    v_delta += (1 / n_avg) * (v(zt_tar, t_i, conds["edit"], tar_g) - v(zt_src, t_i, conds["source"],
                                                                                       src_g))
                zt_edit = zt_edit + (t_im1 - t_i) * v_delta
            else:
                if i == T - n_min:
                    fwd_noise = randn()
                    xt_src = t_i * fwd_noise + (1 - t_i) * x_src
                    xt_tar = zt_edit + xt_src - x_src
                xt_tar = xt_tar + (t_im1 - t_i) * v(xt_tar, t_i, conds["edit"], tar_g)
    return fmt.process_out(zt_edit if n_min == 0 else xt_tar)


@pytest.mark.parametrize("n_max,n_min,n_avg", [(7, 0, 1), (10, 0, 2), (8, 3, 1)])
def test_flowedit_equals_the_reference_loop(flow, n_max, n_min, n_avg):
    """n_max = 10 of 10 starts at sigma 1 (the DisableNoise case a plain CFGGuider turns into a zero start)."""
    family, model, conds = flow
    latent, sigmas = photo_latent(family, 1), sigmas_for(model)
    src_g, tar_g = SCALES[family]
    out = sample(guider(family, model, conds, n_max=n_max, n_min=n_min, n_avg=n_avg, seed=5), latent, sigmas)
    ref = reference_flowedit(family, model, conds, latent, sigmas, src_g, tar_g, n_max, n_min, n_avg, 5)
    assert out.shape == latent["samples"].shape
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
    assert rel_err(out, latent["samples"]) > 0.05  # it edits
    other_seed = sample(guider(family, model, conds, n_max=n_max, n_min=n_min, n_avg=n_avg, seed=6), latent, sigmas)
    assert rel_err(other_seed, ref) > 1e-3  # the seed is the reference's noise


# --- reductions -------------------------------------------------------------------------------------------------------

def test_same_caption_returns_the_photo(flow):
    """Edit caption = source caption at the same guidance: both branches predict alike and no step moves the latent.
    Measured max abs error (latents of RMS 1): SD3 and Flux 2.4e-7, Qwen-Image 4.8e-7 (rounding of the start and of
    the latent scaling); another caption moves it by far more."""
    family, model, conds = flow
    latent, sigmas = photo_latent(family, 2), sigmas_for(model)
    g = SCALES[family][0]
    same = sample(guider(family, model, conds, edit=conds["source"], src_g=g, tar_g=g, n_max=10, n_avg=2), latent,
                  sigmas)
    assert (same - latent["samples"]).abs().max() < 1e-5
    edited = sample(guider(family, model, conds, src_g=g, tar_g=g, n_max=10), latent, sigmas)
    assert (edited - latent["samples"]).abs().max() > 0.05


def test_n_max_zero_returns_the_photo(flow):
    family, model, conds = flow
    latent = photo_latent(family, 3)
    out = sample(guider(family, model, conds, n_max=0), latent, sigmas_for(model))
    assert torch.equal(out, latent["samples"])


def test_runs_the_last_n_max_steps_of_the_stock_schedule(sd3):
    """The progress bar and previews: the sampler runs n_max steps, from sigmas[T - n_max], and its denoised output
    (the edited branch's clean estimate) at the last step to sigma 0 is the result."""
    model, conds = sd3
    sigmas, latent = sigmas_for(model, 12), photo_latent("sd3", 4)
    seen = []
    g = guider("sd3", model, conds, n_max=5)
    with torch.inference_mode():
        out = g.sample(torch.zeros_like(latent["samples"]), latent["samples"], comfy.samplers.sampler_object("euler"),
                       sigmas, callback=lambda i, x0, x, total: seen.append((i, total)), disable_pbar=True, seed=0)
    assert seen == [(i, 5) for i in range(5)]
    with torch.inference_mode():
        result = ncs.SamplerCustomAdvanced().sample(ncs.Noise_EmptyNoise(), g, comfy.samplers.sampler_object("euler"),
                                                    sigmas, latent)
    assert torch.allclose(result[0]["samples"], out) and rel_err(result[1]["samples"], out) < 1e-5


# --- the hand-over of the photo, and what is refused -----------------------------------------------------------------

def test_disable_noise_hands_the_photo_over_and_other_noise_is_refused(sd3):
    """At sigma 1 a flow model's noise_scaling replaces the LATENT by the noise: the stock CFGGuider with DisableNoise
    starts from zeros (the wiring issue 27 measured). The FlowEdit guider hands the photo over instead (its first
    prediction sees the photo: the same-caption run stays at it), and refuses a NOISE that is not zero, naming
    DisableNoise."""
    model, conds = sd3
    latent, sigmas = photo_latent("sd3", 5), sigmas_for(model)
    recording = model.clone()
    first = []

    def record(executor, x, timestep, model_options, seed):
        if not first:
            first.append(x.clone())
        return executor(x, timestep, model_options, seed)

    _comfy.add_wrapper(recording, "PREDICT_NOISE", "record_start", record)
    stock = comfy.samplers.CFGGuider(recording)
    stock.set_conds(conds["source"], conds["null"])
    stock.set_cfg(1.0)
    sample(stock, latent, sigmas)
    seen = {"stock": first.pop()}
    sample(guider("sd3", recording, conds, edit=conds["source"], src_g=3.5, tar_g=3.5, n_max=10), latent, sigmas)
    seen["flowedit"] = first.pop()
    x_src = _comfy.latent_format(model).process_in(latent["samples"])
    assert seen["stock"].abs().max() == 0
    assert (seen["flowedit"] - x_src).abs().max() < 1e-5
    g = guider("sd3", model, conds)
    with pytest.raises(ValueError, match="connect DisableNoise to SamplerCustomAdvanced's noise"):
        sample(g, latent, sigmas, noise=ncs.Noise_RandomNoise(0))
    with torch.inference_mode():
        _, payload = DDIMInvert.execute(model, latent, sigmas, conds["source"], 1.0, 0)
        inverted_noise = InvertedNoiseNode.execute(payload)[0]
    with pytest.raises(ValueError, match="connect DisableNoise"):
        sample(g, latent, sigmas, noise=inverted_noise)


def test_refusals_name_the_fix(sd3, flux):
    (model, conds), (fmodel, fconds) = sd3, flux
    sd15 = tiny.build_tiny("sd15", "eps")
    c15 = tiny.conditioning("sd15", 0)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="not flow matching: edit it with PSEdit DDIM Invert"):
            FlowEditGuiderNode.execute(sd15, c15, c15, c15, 3.5, 13.5, 33, 0, 1, 0)
        with pytest.raises(ValueError, match="use PSEdit FlowEdit Flux Guider"):
            FlowEditGuiderNode.execute(fmodel, fconds["null"], fconds["source"], fconds["edit"], 3.5, 13.5, 33, 0, 1, 0)
        with pytest.raises(ValueError, match="use PSEdit FlowEdit Guider, with a null caption"):
            FlowEditFluxGuiderNode.execute(model, conds["source"], conds["edit"], 1.5, 5.5, 24, 0, 1, 0)
        with pytest.raises(ValueError, match="n_min .* must not exceed n_max"):
            FlowEditGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 3.5, 13.5, 5, 6, 1, 0)
        with pytest.raises(ValueError, match="pooled output of width 768 but this SD3 model expects 2048"):
            FlowEditGuiderNode.execute(model, conds["null"], fconds["source"], conds["edit"], 3.5, 13.5, 33, 0, 1, 0)
        auraflow = tiny.build_tiny_unsupported("auraflow")
        with pytest.raises(ValueError, match=r"supports SD1\.x, SD2\.x, SDXL"):
            FlowEditGuiderNode.execute(auraflow, conds["null"], conds["source"], conds["edit"], 3.5, 13.5, 33, 0, 1, 0)
    g = guider("sd3", model, conds)
    sigmas = sigmas_for(model)
    with pytest.raises(ValueError, match="latent_image is empty"):
        sample(g, {"samples": torch.zeros(1, 16, 8, 8)}, sigmas)
    with pytest.raises(ValueError, match="16-channel latents"):
        sample(g, {"samples": torch.randn(1, 4, 8, 8)}, sigmas)
    with pytest.raises(ValueError, match="remove FlipSigmas"):
        sample(g, photo_latent("sd3"), sigmas.flip(0))


def test_non_euler_samplers_are_warned_about(sd3, caplog):
    model, conds = sd3
    latent, sigmas = photo_latent("sd3", 6, size=8), sigmas_for(model, 4)
    with caplog.at_level(logging.WARNING):
        sample(guider("sd3", model, conds, n_max=3), latent, sigmas, sampler="euler")
        assert "Euler step" not in caplog.text
        sample(guider("sd3", model, conds, n_max=3), latent, sigmas, sampler="heun")
    assert "FlowEdit's update is an Euler step" in caplog.text and "sample_heun" in caplog.text


def test_cancel_stops_the_edit(sd3):
    model, conds = sd3
    calls = {"n": 0}
    original = comfy.model_management.throw_exception_if_processing_interrupted

    def interrupt_after_two():
        calls["n"] += 1
        if calls["n"] == 2:
            comfy.model_management.interrupt_current_processing(True)
        original()

    comfy.model_management.throw_exception_if_processing_interrupted = interrupt_after_two
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            sample(guider("sd3", model, conds, n_max=7, n_avg=2), photo_latent("sd3", size=8), sigmas_for(model))
    finally:
        comfy.model_management.throw_exception_if_processing_interrupted = original
        comfy.model_management.interrupt_current_processing(False)
    assert calls["n"] == 2


# --- masks ------------------------------------------------------------------------------------------------------------

def half_mask(size=SIZE * 8):
    m = torch.zeros(1, size, size)
    m[:, :, size // 2:] = 1.0  # the right half may change
    return m


def test_masked_edit_keeps_the_photo_outside(flow):
    """Outside the mask every step's velocity is zero: the photo's latent stays there to float precision (measured
    max abs 3e-7 to 4.8e-7, the start's and the latent scaling's rounding), also with plain final steps (n_min);
    inside it is edited. A hard mask given to the stock SetLatentNoiseMask instead gives the same edit: outside it
    ComfyUI re-noises the latent with the guider's handed-over noise, which keeps the photo at every sigma."""
    family, model, conds = flow
    latent, sigmas = photo_latent(family, 7), sigmas_for(model)
    for n_min in (0, 2):
        out = sample(guider(family, model, conds, n_max=8, n_min=n_min, mask=half_mask()), latent, sigmas)
        left, right = out[..., : SIZE // 2], out[..., SIZE // 2:]
        assert (left - latent["samples"][..., : SIZE // 2]).abs().max() < 1e-5
        assert (right - latent["samples"][..., SIZE // 2:]).abs().max() > 0.05
        if n_min == 0:  # the stock SetLatentNoiseMask does the same: the handed-over noise keeps its outside
            noise_masked = sample(guider(family, model, conds, n_max=8), {**latent, "noise_mask": half_mask()}, sigmas)
            assert rel_err(noise_masked, out) < 1e-5
    with pytest.raises(ValueError, match="another aspect ratio"):
        sample(guider(family, model, conds, mask=torch.ones(1, 64, 128)), latent, sigmas)


# --- perceptual guidance and the estimated mask on the FlowEdit path --------------------------------------------------

@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """Random-weight taesd3_decoder / taef1_decoder files in a vae_approx folder (the real ones are not in
    ../shared/weights), the real LPIPS trunks."""
    if not (tiny.WEIGHTS / "lpips" / "alexnet_features.pth").is_file():
        pytest.skip(f"needs the real LPIPS trunks in {tiny.WEIGHTS / 'lpips'}")
    folder = tmp_path_factory.mktemp("vae_approx")
    tiny.random_taesd_decoder(folder, "taesd3_decoder", seed=1)
    tiny.random_taesd_decoder(folder, "taef1_decoder", seed=2)
    tiny.register_shared_weights()
    folder_paths.add_model_folder_path("vae_approx", str(folder))


def decode(model, samples):
    """``samples`` decoded by the guidance's own (random-weight) TAESD, NCHW, unclamped: a random decoder's output
    is mostly outside [0, 1], and clamping the photo would put the loss's minimum away from its latent."""
    with torch.inference_mode():
        return _comfy.make_decoder(model, None, "taesd")(_comfy.latent_format(model).process_in(samples))


def decoded_photo(model, latent):
    """The photo the latent stands for, as an IMAGE [B, H, W, 3]: its decoding (:func:`decode`)."""
    return decode(model, latent["samples"]).movedim(1, -1)


def alex_lpips(decoded, image):
    """LPIPS (alex) of a decoding (NCHW) to an IMAGE."""
    from psedit_pack.psedit_core.lpips_loader import get_lpips
    from psedit_pack.psedit_core.metrics import lpips_distance

    alex = get_lpips("alex", search_dirs=[tiny.WEIGHTS / "lpips"], allow_download=False)
    return lpips_distance(alex, decoded, image.movedim(-1, 1)).item()


def decoded_lpips(model, image, samples):
    return alex_lpips(decode(model, samples), image)


# The step sizes: LPIPS through a random TAEF1 curves about 30x more than through the random TAESD3 (measured along
# the gradient), so a 'plain' step that helps on SD3 overshoots on Flux and grows the error step after step.
PG_SIZE = 8  # latent side of the perceptual tests (64 px: each guided step decodes and differentiates LPIPS)
PLAIN_STRENGTH = {"sd3": 0.3, "flux": 0.001}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_perceptual_guidance_lowers_lpips_on_the_flowedit_path(family, sd3, flux, decoders):
    """PSEdit Perceptual Guidance wraps the FlowEdit guider as it is: it corrects the prediction FlowEdit returns,
    the edited branch's clean estimate (FE5), so each Euler step moves the edited latent toward the photo. Same
    FlowEdit settings and seed with and without it; LPIPS (alex) of the result to the photo, both decoded by the
    guidance's own (random-weight) TAESD. Step 'plain', target 'latent'. Measured (64 px): SD3 0.0235 -> 0.0147, Flux
    0.0090 -> 0.0058."""
    model, conds = sd3 if family == "sd3" else flux
    latent, sigmas = photo_latent(family, 8, size=PG_SIZE), sigmas_for(model)
    image = decoded_photo(model, latent)
    g = guider(family, model, conds, n_max=7)
    with torch.inference_mode():
        guided = PerceptualGuidanceNode.execute(g, None, image, PLAIN_STRENGTH[family], "alex", "x0", "taesd", "plain",
                                                target="latent")[0]
    plain_lp = decoded_lpips(model, image, sample(g, latent, sigmas))
    guided_lp = decoded_lpips(model, image, sample(guided, latent, sigmas))
    assert guided_lp < 0.75 * plain_lp, (plain_lp, guided_lp)


def test_plain_steps_leave_an_unedited_photo_alone_and_normalized_ones_do_not(sd3, decoders):
    """Where FlowEdit changes nothing (the same caption) its clean estimate is the photo, where LPIPS's gradient
    vanishes: a 'plain' step vanishes with it, a 'normalized' one (fixed size, direction of a vanishing gradient)
    pushes the photo away. Measured LPIPS of the result at strength 0.1 (64 px): plain 1.4e-13, normalized 7.8e-3."""
    model, conds = sd3
    latent, sigmas = photo_latent("sd3", 8, size=PG_SIZE), sigmas_for(model)
    image = decoded_photo(model, latent)
    g = guider("sd3", model, conds, edit=conds["source"], src_g=3.5, tar_g=3.5, n_max=7)
    results = {}
    with torch.inference_mode():
        for step in ("plain", "normalized"):
            guided = PerceptualGuidanceNode.execute(g, None, image, 0.1, "alex", "x0", "taesd", step,
                                                    target="latent")[0]
            results[step] = decoded_lpips(model, image, sample(guided, latent, sigmas))
    assert results["plain"] < results["normalized"] / 10 and results["normalized"] > 1e-3, results


def test_perceptual_guidance_leaves_the_masked_out_photo_alone(sd3, decoders):
    """With a mask on the FlowEdit guider, what a wrapper adds to the prediction (perceptual guidance) acts only
    inside it: outside, the guider hands the sampler its own state, and the photo stays."""
    model, conds = sd3
    image = tiny.photo(PG_SIZE * 8)
    latent, sigmas = photo_latent("sd3", 9, size=PG_SIZE), sigmas_for(model)
    g = guider("sd3", model, conds, n_max=7, mask=half_mask(PG_SIZE * 8))
    with torch.inference_mode():
        guided = PerceptualGuidanceNode.execute(g, None, image, 0.3, "alex", "x0", "taesd", "normalized",
                                                target="latent")[0]
    out, plain = sample(guided, latent, sigmas), sample(g, latent, sigmas)
    assert (out[..., : PG_SIZE // 2] - latent["samples"][..., : PG_SIZE // 2]).abs().max() < 1e-5
    assert (out - plain)[..., PG_SIZE // 2:].abs().max() > 1e-3  # the guidance does act inside


def test_estimated_edit_mask_works_on_the_flowedit_path(flow):
    """PSEdit Edit Mask needs an inversion payload: DDIM Invert of the photo (plain, T model calls) gives it, on
    Qwen-Image's 5-D latents too, and its MASK keeps the photo where it is 0. Measured (16x16, 10 steps, both
    trees): the masks cover 0.59 (SD3), 0.39 (Flux), 0.50 (Qwen-Image) of the image; the same caption twice gives
    an empty mask."""
    family, model, conds = flow
    latent, sigmas = photo_latent(family, 10), sigmas_for(model)
    with torch.inference_mode():
        _, payload = DDIMInvert.execute(model, latent, sigmas, conds["source"], 1.0, 0)
        mask = EditMask.execute(model, payload, conds["source"], conds["edit"], 0.5, 1.0, 0.5, False)[0]
        same = EditMask.execute(model, payload, conds["source"], conds["source"], 0.5, 1.0, 0.5, False)[0]
    assert mask.shape == (1, SIZE * 8, SIZE * 8) and 0.1 < mask.mean() < 0.9, mask.mean()
    assert same.max() == 0
    out = sample(guider(family, model, conds, n_max=8, mask=mask), latent, sigmas)
    from psedit_pack.psedit_core.flowedit import latent_mask

    keep = (latent_mask(mask, (SIZE, SIZE)) == 0).reshape(1, 1, *([1] * (out.ndim - 4)), SIZE, SIZE).expand_as(out)
    assert keep.any() and (out[keep] - latent["samples"][keep]).abs().max() < 1e-5
    assert (out[~keep] - latent["samples"][~keep]).abs().max() > 0.05


# --- perceptual guidance on Qwen-Image (decoder 'vae') ----------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen():
    return tiny.qwen_world()


@pytest.fixture(scope="module", params=["wan21", "lighttaew2_1"])
def qwen_vae(request):
    """Qwen-Image's VAE (Wan 2.1) or lighttaew2_1 as Load VAE loads it, random weights."""
    if request.param == "wan21":
        return request.param, tiny.random_wan21_vae(seed=1)
    vae = tiny.random_taehv_vae(seed=2)
    if vae is None:
        pytest.skip("this ComfyUI has no TAEHV (0.33 added it): Load VAE cannot load lighttaew2_1 here")
    return request.param, vae


def vae_decode(model, vae, samples):
    """``samples`` decoded by the guidance's 'vae' decoder, NCHW, unclamped."""
    with torch.inference_mode():
        return _comfy.make_decoder(model, vae, "vae")(_comfy.latent_format(model).process_in(samples))


def test_vae_decoder_decodes_qwen_latents_as_comfyui_does(qwen, qwen_vae):
    """The guidance's 'vae' decoder on 5-D Qwen-Image latents is ComfyUI's VAEDecode without its clamp: one frame
    out, the VAE's own output map (Wan 2.1 outputs [-1, 1], lighttaew2_1 [0, 1]). Measured max abs: Wan 2.1 1.4e-6
    (0.33, width 8) / 7.7e-7 (0.3.64, width 96), lighttaew2_1 7.3e-7; the decodings' std 0.13-0.16."""
    model, _ = qwen
    name, vae = qwen_vae
    samples = photo_latent("qwen", 8, size=PG_SIZE)["samples"]
    with torch.inference_mode():
        stock = vae.decode(samples)[:, 0].movedim(-1, 1)  # [B, T, H, W, 3] -> NCHW
    ours = vae_decode(model, vae, samples)
    assert ours.shape == (1, 3, PG_SIZE * 8, PG_SIZE * 8)
    assert stock.std() > 0.05  # a decoder that outputs something
    assert (ours.clamp(0, 1) - stock.clamp(0, 1)).abs().max() < 1e-5, name


# LPIPS through these random decoders curves far more than through the random TAESD3 (a 'plain' step of 0.01
# already overshoots on the width-8 Wan VAE), hence the small step.
QWEN_PLAIN_STRENGTH = 0.003


@pytest.mark.parametrize("gradient", ["x0", "full"])
def test_perceptual_guidance_lowers_lpips_on_qwen_flowedit(qwen, qwen_vae, decoders, gradient):
    """PSEdit Perceptual Guidance on Qwen-Image's FlowEdit path, decoding with the connected VAE (decoder 'vae'):
    the Wan 2.1 VAE or lighttaew2_1, gradient through the decoder or through the transformer too. Same FlowEdit
    settings and seed with and without it; LPIPS (alex) of the result to the photo, both decoded by that VAE. Step
    'plain', target 'latent'. Measured (64 px, gradient x0): Wan 2.1 VAE 0.0281 -> 0.0141 (ComfyUI 0.33, width 8)
    and 0.0190 -> 0.0132 (0.3.64, width 96); lighttaew2_1 0.0439 -> 0.0191."""
    model, conds = qwen
    name, vae = qwen_vae
    latent, sigmas = photo_latent("qwen", 8, size=PG_SIZE), sigmas_for(model)
    image = vae_decode(model, vae, latent["samples"]).movedim(1, -1)
    g = guider("qwen", model, conds, n_max=7)
    with torch.inference_mode():
        guided = PerceptualGuidanceNode.execute(g, vae, image, QWEN_PLAIN_STRENGTH, "alex", gradient, "vae", "plain",
                                                target="latent")[0]
    lp = {k: alex_lpips(vae_decode(model, vae, sample(gg, latent, sigmas)), image)
          for k, gg in (("plain", g), ("guided", guided))}
    assert lp["guided"] < 0.8 * lp["plain"], (name, gradient, lp)


def test_qwen_perceptual_guidance_needs_a_vae_decoder(qwen, decoders):
    """No TAESD decoder of the kind 'taesd' loads exists for Qwen-Image's latents: the node refuses it and names
    decoder 'vae' (with the checkpoint's VAE or lighttaew2_1); 'vae' without a VAE names the VAE input."""
    model, conds = qwen
    g = guider("qwen", model, conds, n_max=7)
    image = tiny.photo(PG_SIZE * 8)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="choose decoder 'vae'.*lighttaew2_1"):
            PerceptualGuidanceNode.execute(g, None, image, 0.3, "alex", "x0", "taesd", "plain")
        with pytest.raises(ValueError, match="needs a VAE connected"):
            PerceptualGuidanceNode.execute(g, None, image, 0.3, "alex", "x0", "vae", "plain")
