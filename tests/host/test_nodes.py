"""Host tier: PSEdit's nodes run the way ComfyUI runs them (real ComfyUI from COMFYUI_PATH, tiny models in code,
under ``torch.inference_mode()``, sampling through the stock ``SamplerCustomAdvanced``)."""

from __future__ import annotations

import asyncio

import pytest
import tiny
import torch

try:
    tiny.load_pack()
except tiny.ComfyUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

import comfy.model_management  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy_extras.nodes_custom_sampler as ncs  # noqa: E402
from psedit_pack import comfy_entrypoint  # noqa: E402
from psedit_pack.nodes import NODES  # noqa: E402
from psedit_pack.nodes.guidance import PerceptualGuidanceNode, StepWindowNode, TripleGuiderNode  # noqa: E402
from psedit_pack.nodes.inversion import DDIMInvert  # noqa: E402
from psedit_pack.nodes.nulltext import NullTextInversion  # noqa: E402
from psedit_pack.psedit_core.lpips_loader import get_lpips  # noqa: E402
from psedit_pack.psedit_core.metrics import lpips_distance  # noqa: E402

FAMILIES = [("sd15", "eps"), ("sd15", "v"), ("sdxl", "eps")]


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda p: "-".join(p))
def setup(request):
    family, prediction = request.param
    model = tiny.build_tiny(family, prediction)
    conds = {name: tiny.conditioning(family, seed) for seed, name in enumerate(("null", "source", "edit"))}
    return family, model, conds


@pytest.fixture(scope="module")
def sd15():
    return tiny.build_tiny("sd15", "eps"), {n: tiny.conditioning("sd15", s) for s, n in enumerate(("null", "source",
                                                                                                    "edit"))}


@pytest.fixture(scope="module")
def vae():
    v = tiny.taesd_vae("sd15")
    if v is None:
        pytest.skip("needs the real TAESD files in ../shared/weights")
    tiny.register_shared_weights()
    return v


def sigmas_for(model, steps=10, scheduler="normal"):
    with torch.inference_mode():
        return ncs.BasicScheduler().get_sigmas(model, scheduler, steps, 1.0)[0]


def sample(guider, latent, sigmas, sampler="euler"):
    with torch.inference_mode():
        return ncs.SamplerCustomAdvanced().sample(
            ncs.Noise_EmptyNoise(), guider, comfy.samplers.sampler_object(sampler), sigmas, latent
        )[0]["samples"]


cfg_guider = tiny.cfg_guider


def random_latent(seed=0, size=8, batch=1):
    return {"samples": torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# --- inversion -------------------------------------------------------------------------------------------------------

def test_invert_then_regenerate_reconstructs(setup):
    family, model, conds = setup
    latent = random_latent()
    original = latent["samples"].clone()
    sigmas = sigmas_for(model)
    errors, plain = {}, {}
    for refine in (0, 3):
        with torch.inference_mode():
            inverted, payload = DDIMInvert.execute(model, latent, sigmas, conds["source"], 1.0, refine)
        plain[refine] = inverted
        assert inverted["samples"].shape == original.shape and payload.inversion.steps == 10
        assert inverted["samples"].std() > 3 * original.std()  # it really is a noise latent
        out = sample(cfg_guider(model, conds["source"], conds["null"], 1.0), inverted, sigmas)
        errors[refine] = rel_err(out, original)
    assert torch.equal(latent["samples"], original)  # input untouched
    assert errors[3] < 0.05 and errors[3] < errors[0] / 2, errors
    with torch.inference_mode():
        target, _ = DDIMInvert.execute(model, latent, sigmas, conds["source"], 1.0, 0, convention="target")
        refined, _ = DDIMInvert.execute(model, latent, sigmas, conds["source"], 1.0, 3, convention="target")
    out = sample(cfg_guider(model, conds["source"], conds["null"], 1.0), target, sigmas)
    assert (target["samples"] - plain[0]["samples"]).abs().max() > 1e-4  # another plain step than 'start'
    assert rel_err(out, original) < 2 * errors[0]  # and an inversion of the same quality
    refined_out = sample(cfg_guider(model, conds["source"], conds["null"], 1.0), refined, sigmas)
    assert rel_err(refined_out, original) < 0.05  # refine solves each step from it too


def test_inversion_works_with_stock_ddim_sampler_and_other_scheduler(sd15):
    model, conds = sd15
    latent = random_latent(1)
    sigmas = sigmas_for(model, 8, "karras")
    with torch.inference_mode():
        inverted, _ = DDIMInvert.execute(model, latent, sigmas, conds["source"], 1.0, 4)
    out = sample(cfg_guider(model, conds["source"], conds["null"], 1.0), inverted, sigmas, sampler="ddim")
    assert rel_err(out, latent["samples"]) < 0.05


def test_inversion_cancel_stops_cleanly(sd15):
    model, conds = sd15
    calls = {"n": 0}
    original = comfy.model_management.throw_exception_if_processing_interrupted

    def interrupt_after_three():
        calls["n"] += 1
        if calls["n"] == 3:
            comfy.model_management.interrupt_current_processing(True)
        original()

    comfy.model_management.throw_exception_if_processing_interrupted = interrupt_after_three
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException), torch.inference_mode():
            DDIMInvert.execute(model, random_latent(), sigmas_for(model), conds["source"], 1.0, 0)
    finally:
        comfy.model_management.throw_exception_if_processing_interrupted = original
        comfy.model_management.interrupt_current_processing(False)
    assert calls["n"] == 3


def test_inversion_bad_inputs(sd15):
    model, conds = sd15
    sigmas = sigmas_for(model)
    bad = random_latent()
    bad["samples"][0, 0, 0, 0] = float("nan")
    with torch.inference_mode():
        with pytest.raises(ValueError, match="NaN"):
            DDIMInvert.execute(model, bad, sigmas, conds["source"], 1.0, 0)
        with pytest.raises(ValueError, match="connect a null"):
            DDIMInvert.execute(model, random_latent(), sigmas, conds["source"], 5.0, 0)
        with pytest.raises(ValueError, match="convention must be one of"):
            DDIMInvert.execute(model, random_latent(), sigmas, conds["source"], 1.0, 0, convention="middle")
        with pytest.raises(ValueError, match="FlipSigmas"):
            DDIMInvert.execute(model, random_latent(), sigmas.flip(0), conds["source"], 1.0, 0)
        with pytest.raises(ValueError, match="4-channel"):
            DDIMInvert.execute(model, {"samples": torch.randn(1, 16, 8, 8)}, sigmas, conds["source"], 1.0, 0)
        with pytest.raises(ValueError, match="width 2048"):
            DDIMInvert.execute(model, random_latent(), sigmas, tiny.conditioning("sdxl", 1), 1.0, 0)


# --- triple guider -------------------------------------------------------------------------------------------------

def test_triple_guider_equals_dual_cfg(setup):
    family, model, conds = setup
    latent = random_latent(2)
    sigmas = sigmas_for(model)
    with torch.inference_mode():
        inverted, _ = DDIMInvert.execute(model, latent, sigmas, conds["source"], 1.0, 0)
        triple = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 7.5, 3.0)[0]
        dual = ncs.DualCFGGuider().get_guider(model, conds["edit"], conds["source"], conds["null"], 3.0, 7.5,
                                              "regular")[0]
    a, b = sample(triple, inverted, sigmas), sample(dual, inverted, sigmas)
    plain = sample(cfg_guider(model, conds["edit"], conds["null"], 7.5), inverted, sigmas)
    assert rel_err(a, b) < 1e-5
    assert rel_err(a, plain) > 1e-2  # and it is not plain CFG


def test_triple_guider_keeps_pre_and_post_cfg_patches(sd15):
    """Model patches run as in DualCFGGuider: pre-CFG hooks on the three predictions, then ComfyUI's cfg_function
    (with its post-CFG hooks) on the text part ``null + gamma (src - null)``, plus ``beta (edit - src)``:
    prediction = post(text(pre(out))) + beta (pre(edit) - pre(src))."""
    model, conds = sd15
    patched = model.clone()
    patched.set_model_sampler_pre_cfg_function(lambda args: [o * 0.9 for o in args["conds_out"]])
    patched.set_model_sampler_post_cfg_function(lambda args: args["denoised"] * 0.5 + args["input"] * 0.5)
    latent, sigmas = random_latent(3), sigmas_for(model)
    with torch.inference_mode():
        triple = TripleGuiderNode.execute(patched, conds["null"], conds["source"], conds["edit"], 6.0, 2.0)[0]
        unpatched = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 6.0, 2.0)[0]
        text_only = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 6.0, 0.0)[0]
    p, u, t = (probe(g, latent, sigmas, [2])[2] for g in (triple, unpatched, text_only))
    x = latent["samples"] * 0.18215  # the probe evaluates at the (model-space) input latent
    assert torch.allclose(p, 0.5 * (0.9 * t) + 0.5 * x + 0.9 * (u - t), atol=1e-5)


def probe(guider, latent, sigmas, at):
    """The guider's denoised prediction at ``sigmas[i]`` for each i in ``at`` (during a real sample() set-up)."""
    seen = {}

    def fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        for i in at:
            seen[i] = model_k(x, sigmas[i] * x.new_ones([x.shape[0]]), **extra_args).clone()
        return x

    with torch.inference_mode():
        guider.sample(torch.zeros_like(latent["samples"]), latent["samples"], comfy.samplers.KSAMPLER(fn), sigmas,
                      disable_pbar=True, seed=0)
    return seen


def test_triple_guider_window_is_plain_cfg_outside(sd15):
    model, conds = sd15
    latent, sigmas = random_latent(4), sigmas_for(model)
    with torch.inference_mode():
        window = StepWindowNode.execute(0.5, 1.0)[0]
        triple = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 7.5, 3.0, window)[0]
        full = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 7.5, 3.0)[0]
    cfg = cfg_guider(model, conds["edit"], conds["null"], 7.5)
    t, f, c = (probe(g, latent, sigmas, [1, 7]) for g in (triple, full, cfg))
    assert torch.allclose(t[1], c[1], atol=1e-5) and not torch.allclose(t[1], f[1], atol=1e-3)
    assert torch.allclose(t[7], f[7], atol=1e-5) and not torch.allclose(t[7], c[7], atol=1e-3)


def test_triple_guider_bad_inputs():
    sdxl = tiny.build_tiny("sdxl")
    sd1 = tiny.conditioning("sd15", 0)
    xl = tiny.conditioning("sdxl", 0)
    with pytest.raises(ValueError, match="width 768.*expects 2048"):
        TripleGuiderNode.execute(sdxl, xl, sd1, xl, 7.5, 3.0)
    no_pooled = [[xl[0][0], {}]]
    with pytest.raises(ValueError, match="pooled"):
        TripleGuiderNode.execute(sdxl, xl, xl, no_pooled, 7.5, 3.0)
    with pytest.raises(ValueError, match="start"):
        StepWindowNode.execute(0.6, 0.2)


def test_empty_window_errors_at_sampling(sd15):
    model, conds = sd15
    with torch.inference_mode():
        window = StepWindowNode.execute(0.0, 0.04)[0]  # no step of a 10-step schedule
        triple = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 7.5, 3.0, window)[0]
    with pytest.raises(ValueError, match="holds no step"):
        sample(triple, random_latent(), sigmas_for(model))


# --- perceptual guidance -------------------------------------------------------------------------------------------

def invert_photo(model, conds, vae, size):
    """A real photo, its TAESD latent, 10-step sigmas, the inversion and a Triple Guider (gamma 7.5, beta 3)."""
    image = tiny.photo(size)
    with torch.inference_mode():
        latent = {"samples": vae.encode(image)}
        sigmas = sigmas_for(model)
        inverted, payload = DDIMInvert.execute(model, latent, sigmas, conds["source"], 1.0, 2)
        triple = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 7.5, 3.0)[0]
    return image, latent, sigmas, inverted, payload, triple


@pytest.fixture(scope="module")
def edit_scene(sd15, vae):
    model, conds = sd15
    image, latent, sigmas, inverted, payload, triple = invert_photo(model, conds, vae, 64)
    alex = get_lpips("alex", search_dirs=[tiny.WEIGHTS / "lpips"], allow_download=False)

    def lpips_to_photo(samples):
        with torch.inference_mode():
            decoded = vae.decode(samples)
        return lpips_distance(alex, decoded.movedim(-1, 1), image.movedim(-1, 1)).item()

    return model, conds, image, latent, sigmas, inverted, payload, triple, lpips_to_photo


@pytest.mark.parametrize("decoder,gradient", [("taesd", "x0"), ("vae", "x0"), ("taesd", "full")])
def test_perceptual_guidance_lowers_lpips(edit_scene, vae, decoder, gradient):
    model, conds, image, latent, sigmas, inverted, _, triple, lpips_to_photo = edit_scene
    before_opts = dict(triple.model_options)
    image_copy = image.clone()
    with torch.inference_mode():
        guided = PerceptualGuidanceNode.execute(triple, vae, image, 0.1, "vgg", gradient, decoder, "normalized")[0]
    plain_lp = lpips_to_photo(sample(triple, inverted, sigmas))
    guided_lp = lpips_to_photo(sample(guided, inverted, sigmas))
    assert guided_lp < 0.85 * plain_lp, (plain_lp, guided_lp)
    assert triple.model_options == before_opts and torch.equal(image, image_copy)  # inputs untouched


def test_perceptual_guidance_is_identity_outside_window(edit_scene, vae):
    model, conds, image, latent, sigmas, inverted, _, triple, _ = edit_scene
    with torch.inference_mode():
        window = StepWindowNode.execute(0.5, 1.0)[0]
        guided = PerceptualGuidanceNode.execute(triple, vae, image, 0.5, "vgg", "x0", "taesd", "normalized",
                                                window=window)[0]
    g, t = probe(guided, inverted, sigmas, [1, 8]), probe(triple, inverted, sigmas, [1, 8])
    assert torch.equal(g[1], t[1])
    assert not torch.allclose(g[8], t[8], atol=1e-4)


def test_perceptual_guidance_bad_inputs(edit_scene, vae):
    model, conds, image, latent, sigmas, inverted, _, triple, _ = edit_scene
    with torch.inference_mode():
        wrong_size = PerceptualGuidanceNode.execute(triple, vae, tiny.photo(48), 0.3, "vgg", "x0", "taesd",
                                                    "normalized")[0]
        wrong_batch = PerceptualGuidanceNode.execute(triple, vae, tiny.photo(64, batch=3), 0.3, "vgg", "x0",
                                                     "taesd", "normalized")[0]
        odd = PerceptualGuidanceNode.execute(triple, vae, tiny.photo(68), 0.3, "vgg", "x0", "taesd",
                                             "normalized")[0]
    with pytest.raises(ValueError, match="source image is 48x48 but the latent decodes to 64x64"):
        sample(wrong_size, inverted, sigmas)
    with pytest.raises(ValueError, match="batch"):
        sample(wrong_batch, inverted, sigmas)
    # 68x68 is what VAEEncode would crop to 64x64, so it is accepted.
    assert torch.isfinite(sample(odd, inverted, sigmas)).all()


# --- null-text inversion --------------------------------------------------------------------------------------------

def test_null_text_inversion_reconstructs_at_guidance_7_5(edit_scene):
    model, conds, image, latent, sigmas, inverted, payload, _, _ = edit_scene

    def regenerate(schedule):
        with torch.inference_mode():
            g = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 7.5, 0.0, None,
                                         schedule)[0]
        return sample(g, inverted, sigmas)

    with torch.inference_mode():
        npi = NullTextInversion.execute(model, payload, conds["null"], conds["source"], 7.5, "negative-prompt", 10,
                                        1e-5, 0.01)[0]
        nti = NullTextInversion.execute(model, payload, conds["null"], conds["source"], 7.5, "null-text", 10,
                                        1e-5, 0.01)[0]
    target = latent["samples"]
    plain_err = rel_err(regenerate(None), target)
    assert rel_err(regenerate(nti), target) < plain_err / 5
    assert rel_err(regenerate(npi), target) < plain_err / 5
    assert len(nti.conds) == 10 and len(nti.losses) == 10


def test_null_schedule_must_match_sigmas(edit_scene):
    model, conds, image, latent, sigmas, inverted, payload, _, _ = edit_scene
    with torch.inference_mode():
        npi = NullTextInversion.execute(model, payload, conds["null"], conds["source"], 7.5, "negative-prompt", 10,
                                        1e-5, 0.01)[0]
        g = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 7.5, 3.0, None, npi)[0]
    with pytest.raises(ValueError, match="same SIGMAS"):
        sample(g, inverted, sigmas_for(model, 12))


# --- schema ---------------------------------------------------------------------------------------------------------

def test_every_node_documented():
    ids = set()
    for node in NODES:
        schema = node.define_schema()
        schema.validate()  # what ComfyUI checks when it loads the pack (unique ids, ...)
        assert schema.node_id.startswith("PSEdit") and schema.display_name.startswith("PSEdit ")
        assert len(schema.description) > 40, schema.node_id
        for inp in schema.inputs:
            assert inp.tooltip and len(inp.tooltip) > 10, (schema.node_id, inp.id)
        ids.add(schema.node_id)
    extension = asyncio.run(comfy_entrypoint())
    listed = asyncio.run(extension.get_node_list())
    assert {n.define_schema().node_id for n in listed} == ids and len(ids) == len(NODES)


# --- edit masks and masked guidance ---------------------------------------------------------------------------------

def test_edit_mask_estimate_and_user_mask(edit_scene):
    from psedit_pack.nodes.masks import EditMask

    model, conds, image, latent, sigmas, inverted, payload, _, _ = edit_scene
    with torch.inference_mode():
        m = EditMask.execute(model, payload, conds["source"], conds["edit"], 0.5, 1.0, 0.5, False)[0]
        soft = EditMask.execute(model, payload, conds["source"], conds["edit"], 0.5, 1.0, 0.5, True)[0]
        same = EditMask.execute(model, payload, conds["source"], conds["source"], 0.5, 1.0, 0.5, False)[0]
        user = torch.zeros(1, 32, 32)
        user[:, :, :16] = 1
        passed = EditMask.execute(model, payload, conds["source"], conds["edit"], 0.5, 1.0, 0.5, False, user)[0]
    assert m.shape == (1, 64, 64) and set(m.unique().tolist()) == {0.0, 1.0}
    assert ((m == (soft >= 0.5).float()).float().mean() > 0.9) and 0 < soft.mean() < 1
    assert same.abs().sum() == 0  # identical captions: nothing to edit
    assert passed.shape == (1, 64, 64) and passed[0, 10, 5] == 1 and passed[0, 10, 60] == 0
    with pytest.raises(ValueError, match="width 2048"):
        EditMask.execute(model, payload, tiny.conditioning("sdxl", 0), conds["edit"], 0.5, 1.0, 0.5, False)


def test_masked_guidance_protects_outside_frees_inside(sd15, vae):
    """A known edit region (left half of a 256x256 photo): masked guidance pulls the right half closer to the photo
    than whole-image guidance, and leaves the left half as changed as no guidance does. (At 64x64 the decoder's and
    LPIPS's receptive fields span both halves, so the test needs the larger image.)"""
    model, conds = sd15
    image, _, sigmas, inverted, _, triple = invert_photo(model, conds, vae, 256)
    region = torch.zeros(1, 256, 256)
    region[:, :, :128] = 1
    alex = get_lpips("alex", search_dirs=[tiny.WEIGHTS / "lpips"], allow_download=False, spatial=True)

    def side_lpips(samples):
        with torch.inference_mode():
            decoded = vae.decode(samples).movedim(-1, 1)
        d = alex(decoded * 2 - 1, image.movedim(-1, 1) * 2 - 1)
        return d[..., :128].mean().item(), d[..., 128:].mean().item()  # (inside, outside)

    with torch.inference_mode():
        whole = PerceptualGuidanceNode.execute(triple, vae, image, 0.03, "vgg", "x0", "taesd", "normalized")[0]
        masked = PerceptualGuidanceNode.execute(triple, vae, image, 0.03, "vgg", "x0", "taesd", "normalized",
                                                mask=region)[0]
    none_in, none_out = side_lpips(sample(triple, inverted, sigmas))
    whole_in, whole_out = side_lpips(sample(whole, inverted, sigmas))
    masked_in, masked_out = side_lpips(sample(masked, inverted, sigmas))
    assert masked_out < whole_out < none_out, (none_out, whole_out, masked_out)
    assert masked_in >= 0.95 * none_in and whole_in < 0.9 * none_in, (none_in, whole_in, masked_in)
