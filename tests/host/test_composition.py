"""Host tier: PSEdit's guiders beside the patches and control models users already have (issue 15).

Every model here is built under ``torch.inference_mode()``, as ComfyUI's executor builds it. Each PSEdit result is
compared with the stock guider that must give the same answer: the Triple Guider is DualCFGGuider(cond1 = edit,
cond2 = source, negative = null, cfg_conds = beta, cfg_cond2_negative = gamma), and with beta = gamma it is
CFGGuider(edit, null, gamma), the source cancelling.
"""

from __future__ import annotations

import pytest
import tiny
import torch

try:
    tiny.load_pack()
except tiny.ComfyUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

import comfy.samplers  # noqa: E402
import comfy_extras.nodes_apg as napg  # noqa: E402
import comfy_extras.nodes_custom_sampler as ncs  # noqa: E402
import comfy_extras.nodes_model_advanced as nma  # noqa: E402
import comfy_extras.nodes_sag as nsag  # noqa: E402
import comfy_extras.nodes_tcfg as ntcfg  # noqa: E402
from _comfy_env import run_node  # noqa: E402
from psedit_pack.nodes.guidance import TripleGuiderNode  # noqa: E402
from psedit_pack.nodes.inversion import DDIMInvert  # noqa: E402
from psedit_pack.nodes.nulltext import NullTextInversion  # noqa: E402

import nodes as comfy_nodes  # noqa: E402

GAMMA, BETA = 7.5, 3.0


@pytest.fixture(scope="module")
def world():
    model = tiny.build_tiny("sd15", "eps")
    conds = {name: tiny.conditioning("sd15", seed) for seed, name in enumerate(("null", "source", "edit"))}
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))}
    with torch.inference_mode():
        sigmas = ncs.BasicScheduler().get_sigmas(model, "normal", 8, 1.0)[0]
    return model, conds, latent, sigmas


def sample(guider, latent, sigmas):
    with torch.inference_mode():
        return ncs.SamplerCustomAdvanced().sample(
            ncs.Noise_EmptyNoise(), guider, comfy.samplers.sampler_object("euler"), sigmas, latent
        )[0]["samples"]


def triple(model, conds, gamma=GAMMA, beta=BETA, **kw):
    with torch.inference_mode():
        return TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], gamma, beta, **kw)[0]


def dual(model, conds, gamma=GAMMA, beta=BETA):
    with torch.inference_mode():
        return ncs.DualCFGGuider().get_guider(model, conds["edit"], conds["source"], conds["null"], beta, gamma,
                                              "regular")[0]


def cfg(model, conds, scale=GAMMA):
    g = comfy.samplers.CFGGuider(model)
    g.set_conds(conds["edit"], conds["null"])
    g.set_cfg(scale)
    return g


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def patched(model, node, **inputs):
    with torch.inference_mode():
        return run_node(node, model=model, **inputs)[0]


# --- CFG patches ------------------------------------------------------------------------------------------------------

def test_rescale_cfg_acts_and_matches_dual_cfg(world):
    """RescaleCFG is a ``sampler_cfg_function``: inside the window the Triple Guider must call it as DualCFG does."""
    model, conds, latent, sigmas = world
    rescaled = patched(model, nma.RescaleCFG, multiplier=0.7)
    with_patch, without = sample(triple(rescaled, conds), latent, sigmas), sample(triple(model, conds), latent, sigmas)
    assert rel_err(with_patch, without) > 1e-2  # the patch is not skipped
    assert rel_err(with_patch, sample(dual(rescaled, conds), latent, sigmas)) < 1e-5


@pytest.mark.parametrize("node,inputs", [
    (ntcfg.TCFG, {}),
    (napg.APG, {"eta": 0.0, "norm_threshold": 5.0, "momentum": 0.0}),
], ids=["TCFG", "APG"])
def test_pre_cfg_patches_see_cond_first(world, node, inputs):
    """TCFG and APG read ``conds_out[0]`` as the cond and ``[1]`` as the uncond: with beta = gamma the Triple Guider
    must equal CFG(edit, null) with the same patch."""
    model, conds, latent, sigmas = world
    m = patched(model, node, **inputs)
    ref = sample(cfg(m, conds), latent, sigmas)
    assert rel_err(ref, sample(cfg(model, conds), latent, sigmas)) > 1e-2  # the patch changes CFG
    assert rel_err(sample(triple(m, conds, beta=GAMMA), latent, sigmas), ref) < 1e-5


def test_pre_cfg_hook_gets_edit_null_source_in_that_order(world):
    """An order-sensitive hook: it records the conds it is handed and scales only ``conds_out[0]``."""
    model, conds, latent, sigmas = world
    seen = []

    def hook(args):
        seen.append([c[0]["model_conds"]["c_crossattn"].cond for c in args["conds"]])
        out = list(args["conds_out"])
        out[0] = out[0] * 1.1
        return out

    m = model.clone()
    m.set_model_sampler_pre_cfg_function(hook)
    got = sample(triple(m, conds), latent, sigmas)
    order = [torch.equal(seen[0][i], conds[name][0][0]) for i, name in enumerate(("edit", "null", "source"))]
    assert order == [True, True, True]

    def edit_scaled(args):  # the same change, made by a hook that knows its branch by the cond it reads
        out = list(args["conds_out"])
        i = [torch.equal(c[0]["model_conds"]["c_crossattn"].cond, conds["edit"][0][0]) for c in args["conds"]]
        out[i.index(True)] = out[i.index(True)] * 1.1
        return out

    ref_model = model.clone()
    ref_model.set_model_sampler_pre_cfg_function(edit_scaled)
    assert rel_err(got, sample(triple(ref_model, conds), latent, sigmas)) < 1e-6
    assert rel_err(got, sample(triple(model, conds), latent, sigmas)) > 1e-3


def test_self_attention_guidance_reads_null_as_uncond(world):
    """SAG records the attention of the batch entry whose ``cond_or_uncond`` is 1 and re-runs ``uncond``: with
    beta = gamma, Triple + SAG must equal CFG + SAG."""
    model, conds, latent, sigmas = world
    m = patched(model, nsag.SelfAttentionGuidance, scale=0.8, blur_sigma=2.0)
    ref = sample(cfg(m, conds), latent, sigmas)
    assert rel_err(ref, sample(cfg(model, conds), latent, sigmas)) > 1e-3
    assert rel_err(sample(triple(m, conds, beta=GAMMA), latent, sigmas), ref) < 1e-5


def test_beta_equal_to_gamma_is_cfg_from_two_branches(world):
    """At beta = gamma the source cancels: the Triple Guider evaluates edit and null only (as CFGGuider does), and
    gives CFGGuider's result; at beta 3 it evaluates three branches."""
    model, conds, latent, sigmas = world
    rows = []

    def count(apply_model, args):
        rows.append(int(args["input"].shape[0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    m = model.clone()
    m.set_model_unet_function_wrapper(count)
    got = sample(triple(m, conds, beta=GAMMA), latent, sigmas)
    assert set(rows) == {2}, rows
    assert rel_err(got, sample(cfg(model, conds), latent, sigmas)) < 1e-6
    rows.clear()
    sample(triple(m, conds), latent, sigmas)
    assert set(rows) == {3}, rows


# --- ControlNet on the conditioning ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def controlnet():
    net = tiny.build_tiny_controlnet("sd15")
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(9))
    return net, hint


def apply_old(cond, controlnet):
    """The stock (old) Apply ControlNet node: ``control_apply_to_uncond``, so ComfyUI copies it to the negatives."""
    net, hint = controlnet
    with torch.inference_mode():
        return comfy_nodes.ControlNetApply().apply_controlnet(cond, net, hint, 1.0)[0]


def test_old_apply_controlnet_reaches_null_and_source(world, controlnet):
    model, conds, latent, sigmas = world
    on_edit = dict(conds, edit=apply_old(conds["edit"], controlnet))
    on_all = {k: apply_old(v, controlnet) for k, v in conds.items()}
    got = sample(triple(model, on_edit), latent, sigmas)
    assert rel_err(got, sample(triple(model, conds), latent, sigmas)) > 1e-2  # the ControlNet acts
    assert rel_err(got, sample(triple(model, on_all), latent, sigmas)) < 1e-5
    assert rel_err(got, sample(dual(model, on_edit), latent, sigmas)) < 1e-5


def test_old_apply_controlnet_reaches_a_null_schedule(world, controlnet):
    """Per-step null conds (negative-prompt inversion here) are negatives too."""
    model, conds, latent, sigmas = world
    with torch.inference_mode():
        inv = DDIMInvert.execute(model, latent, sigmas, conds["source"], 1.0, 0)[1]
        schedule = NullTextInversion.execute(model, inv, conds["null"], conds["source"], GAMMA, "negative-prompt", 0,
                                             1e-5, 0.01)[0]
        inv_cn = DDIMInvert.execute(model, latent, sigmas, apply_old(conds["source"], controlnet), 1.0, 0)[1]
        schedule_cn = NullTextInversion.execute(model, inv_cn, conds["null"], apply_old(conds["source"], controlnet),
                                                GAMMA, "negative-prompt", 0, 1e-5, 0.01)[0]
    on_edit = dict(conds, edit=apply_old(conds["edit"], controlnet))
    on_all = {k: apply_old(v, controlnet) for k, v in conds.items()}
    got = sample(triple(model, on_edit, null_schedule=schedule), latent, sigmas)
    ref = sample(triple(model, on_all, null_schedule=schedule_cn), latent, sigmas)
    assert rel_err(got, ref) < 1e-5


# --- masks follow the photo -----------------------------------------------------------------------------------------

def test_edit_mask_and_perceptual_guidance_place_a_painted_mask_as_vae_encode_crops(world):
    """A mask painted on a 68x70 photo: VAEEncode drops 2 rows and 3 columns first; the mask must lose the same."""
    from psedit_pack.nodes.guidance import PerceptualWrapper
    from psedit_pack.nodes.masks import EditMask
    from psedit_pack.psedit_core.perceptual import PerceptualGuidanceConfig

    model, conds, latent, sigmas = world
    painted = torch.zeros(1, 68, 70)
    painted[:, 2:10, 3:11] = 1  # the top-left corner of what VAEEncode keeps
    with torch.inference_mode():
        inv = DDIMInvert.execute(model, latent, sigmas, conds["source"], 1.0, 0)[1]
        out = EditMask.execute(model, inv, conds["source"], conds["edit"], 0.5, 1.0, 0.5, False, mask=painted)[0]
    assert out.shape == (1, 64, 64) and out[0, :8, :8].min() == 1 and out.sum() == 64

    wrapper = PerceptualWrapper(model, None, torch.rand(1, 68, 70, 3), PerceptualGuidanceConfig(scale=0.1), "alex",
                                "taesd", None, painted)
    region = wrapper.region_for((64, 64), 8)
    assert torch.equal(region[:, 0], out)


def test_a_mask_of_another_aspect_ratio_is_refused_with_the_fix(world):
    from psedit_pack.nodes.guidance import PerceptualGuidanceNode
    from psedit_pack.nodes.masks import EditMask

    model, conds, latent, sigmas = world
    portrait = torch.zeros(1, 96, 64)
    with torch.inference_mode():
        inv = DDIMInvert.execute(model, latent, sigmas, conds["source"], 1.0, 0)[1]
        with pytest.raises(ValueError, match="scale and crop the mask"):
            EditMask.execute(model, inv, conds["source"], conds["edit"], 0.5, 1.0, 0.5, False, mask=portrait)
        with pytest.raises(ValueError, match="scale and crop the mask"):
            PerceptualGuidanceNode.execute(triple(model, conds), None, torch.rand(1, 64, 64, 3), 0.1, "alex", "x0",
                                           "taesd", "normalized", mask=portrait)


# --- gradients through what ComfyUI attaches -----------------------------------------------------------------------

@pytest.fixture(scope="module", params=["controlnet", "t2i_adapter"])
def photo_world(request, controlnet):
    """A real photo through the real TAESD, a tiny UNet and a ControlNet or T2I adapter wired the usual way (Apply
    ControlNet (Advanced): positive and negative), all built under inference mode."""
    vae = tiny.taesd_vae("sd15")
    if vae is None:
        pytest.skip("needs the real TAESD files in ../shared/weights")
    tiny.register_shared_weights()
    model = tiny.build_tiny("sd15", "eps")
    net, hint = controlnet
    if request.param == "t2i_adapter":
        net = tiny.build_tiny_t2i_adapter()
    base = {name: tiny.conditioning("sd15", seed) for seed, name in enumerate(("null", "source", "edit"))}
    image = tiny.photo(64)
    with torch.inference_mode():
        apply = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet
        source, null = apply(base["source"], base["null"], net, hint, 1.0, 0.0, 1.0)
        edit = apply(base["edit"], base["null"], net, hint, 1.0, 0.0, 1.0)[0]
        latent = {"samples": vae.encode(image)}
        sigmas = ncs.BasicScheduler().get_sigmas(model, "normal", 10, 1.0)[0]
        inverted, payload = DDIMInvert.execute(model, latent, sigmas, source, 1.0, 0)
    return model, vae, dict(null=null, source=source, edit=edit), image, latent, sigmas, inverted, payload


def vgg_to(vae, image, samples):
    """VGG LPIPS of the decoded ``samples`` to ``image``: the loss the guidance below minimises."""
    from psedit_pack.psedit_core.lpips_loader import get_lpips
    from psedit_pack.psedit_core.metrics import lpips_distance

    vgg = get_lpips("vgg", search_dirs=[tiny.WEIGHTS / "lpips"], allow_download=False)
    with torch.inference_mode():
        decoded = vae.decode(samples)
    return lpips_distance(vgg, decoded.movedim(-1, 1), image.movedim(-1, 1)).item()


@pytest.mark.parametrize("window", [(0.2, 0.8), None], ids=["window", "all_steps"])
def test_full_gradient_perceptual_guidance_through_a_control_model(photo_world, window):
    """With the window the first step is unguided, so the control model first runs under inference mode (a
    ControlNet caches its hint there, while its parameters still ask for gradients, as ControlNetLoader leaves
    them); over all steps it first runs with gradients on (a T2I adapter's plain torch layers then build a graph
    over inference-tensor weights). Both sample to the end and the guidance changes the result.

    That it lowers the loss is checked on one step, where it is a property of the method: from the inversion's
    latent at step 4 of 10 to sigma 0 (the x0 prediction), VGG LPIPS through the VAE, measured ControlNet 0.304 ->
    0.262, T2I adapter 0.305 -> 0.267, the same on one and two threads. Over the whole 10-step schedule the tiny
    random UNet is chaotic: a normalized step at the start, where the x0 prediction is the photo and LPIPS's gradient
    nearly vanishes, points wherever rounding sends it, and the final LPIPS moved from 0.129 to 0.166 between one and
    two torch threads (plain 0.137)."""
    from psedit_pack.nodes.guidance import PerceptualGuidanceNode, StepWindowNode

    model, vae, conds, image, latent, sigmas, inverted, _ = photo_world
    guider = triple(model, conds)
    with torch.inference_mode():
        win = StepWindowNode.execute(*window)[0] if window else None
        guided = PerceptualGuidanceNode.execute(guider, vae, image, 0.1, "vgg", "full", "taesd", "normalized",
                                                window=win)[0]
    plain, corrected = sample(guider, inverted, sigmas), sample(guided, inverted, sigmas)
    assert torch.isfinite(corrected).all() and (corrected - plain).abs().max() > 1e-3

    k = 4
    with torch.inference_mode():
        start = DDIMInvert.execute(model, latent, sigmas[k:], conds["source"], 1.0, 0)[0]
        one_step = PerceptualGuidanceNode.execute(guider, vae, image, 0.02, "vgg", "full", "taesd", "normalized")[0]
    to_zero = torch.stack([sigmas[k], sigmas.new_zeros(())])
    before = vgg_to(vae, image, sample(guider, start, to_zero))
    after = vgg_to(vae, image, sample(one_step, start, to_zero))
    assert after < 0.95 * before, (before, after)


def test_null_text_inversion_through_a_control_model(photo_world):
    model, vae, conds, image, latent, sigmas, inverted, payload = photo_world
    with torch.inference_mode():
        schedule = NullTextInversion.execute(model, payload, conds["null"], conds["source"], GAMMA, "null-text", 10,
                                             1e-5, 0.01)[0]
    target = latent["samples"]
    plain = rel_err(sample(triple(model, conds, beta=0.0), inverted, sigmas), target)
    inverted_err = rel_err(sample(triple(model, conds, beta=0.0, null_schedule=schedule), inverted, sigmas), target)
    assert inverted_err < plain / 3, (plain, inverted_err)


@pytest.fixture(scope="module")
def playground(comfyui):
    """Tiny SDXL with the stock ModelSamplingContinuousEDM node set to Playground v2.5 (its latent format's
    per-channel tensors are built under inference mode)."""
    vae = tiny.taesd_vae("sdxl")
    if vae is None:
        pytest.skip("needs the real TAESD files in ../shared/weights")
    tiny.register_shared_weights()
    sdxl = tiny.build_tiny("sdxl", "eps")
    with torch.inference_mode():
        pg = nma.ModelSamplingContinuousEDM().patch(sdxl, "edm_playground_v2.5", 120.0, 0.002)[0]
    return sdxl, pg, vae


def test_perceptual_guidance_on_playground_latents(playground):
    from psedit_pack.nodes.guidance import PerceptualGuidanceNode

    _, pg, vae = playground
    conds = {name: tiny.conditioning("sdxl", seed) for seed, name in enumerate(("null", "source", "edit"))}
    image = tiny.photo(64)
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))}
    with torch.inference_mode():
        sigmas = ncs.BasicScheduler().get_sigmas(pg, "karras", 4, 1.0)[0]
        guided = PerceptualGuidanceNode.execute(triple(pg, conds), vae, image, 0.1, "alex", "x0", "taesd",
                                                "normalized")[0]
    assert torch.isfinite(sample(guided, latent, sigmas)).all()


def test_taesd_decoder_follows_the_model_latent_format(playground):
    """One TAESD-XL file, two latent formats: each model's x0 must be decoded in its own scale, in any order."""
    import comfy.latent_formats
    import psedit_pack.nodes._comfy as pc

    sdxl, pg, _ = playground
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        sdxl_first = pc.make_decoder(sdxl, None, "taesd")(x0)
        pg_out = pc.make_decoder(pg, None, "taesd")(x0)
        sdxl_after = pc.make_decoder(sdxl, None, "taesd")(x0)
        as_sdxl = comfy.latent_formats.SDXL().process_in(comfy.latent_formats.SDXL_Playground_2_5().process_out(x0))
        expected = pc.make_decoder(sdxl, None, "taesd")(as_sdxl)
    assert torch.equal(sdxl_first, sdxl_after)
    assert (pg_out - sdxl_first).abs().mean() > 0.05  # the scales differ
    assert torch.allclose(pg_out, expected, atol=1e-5)


# --- memory that ComfyUI can see -----------------------------------------------------------------------------------

def test_decoders_are_comfy_models_and_nothing_stays_behind(world, taesd_vae):
    """The decoder's weights are a ModelPatcher loaded with the sampling (the VAE's own weights: no copy), and
    what the guidance built for the sampling is dropped when it ends."""
    import comfy.model_management as mm
    from psedit_pack.nodes.guidance import PerceptualGuidanceNode

    tiny.register_shared_weights()
    model, conds, latent, sigmas = world
    image = tiny.photo(64)
    for decoder in ("vae", "taesd"):
        with torch.inference_mode():
            guided = PerceptualGuidanceNode.execute(triple(model, conds), taesd_vae, image, 0.1, "alex", "x0",
                                                    decoder, "normalized")[0]
        wrapper = guided.model_options["transformer_options"]["wrappers"]["predict_noise"]["psedit_perceptual"][0]
        if decoder == "vae":
            assert wrapper.decoder_patcher.model is taesd_vae.first_stage_model  # the VAE itself, not a copy
        sample(guided, latent, sigmas)
        loaded = [m.model for m in mm.current_loaded_models]
        assert any(m.is_clone(wrapper.decoder_patcher) for m in loaded), decoder
        assert wrapper._cache == {}  # released at the end of the sampling
        mm.unload_all_models()
        assert not any(m.is_clone(wrapper.decoder_patcher) for m in (x.model for x in mm.current_loaded_models))


def test_full_gradient_memory_is_in_comfys_estimate(world, monkeypatch):
    """While a gradient-enabled UNet is loaded its ``memory_required`` adds the weight copies and the saved
    activations, and sampling re-loads the models with that estimate (so ComfyUI can offload)."""
    import comfy.model_management as mm
    import psedit_pack.nodes._comfy as pc

    model, conds, latent, sigmas = world
    shape = [2, 4, 64, 64]
    plain = model.model.memory_required(shape)
    grad = pc.differentiable_patcher(model)
    calls = []
    real = mm.load_models_gpu

    def record(models, memory_required=0, **kw):
        calls.append(memory_required)
        return real(models, memory_required=memory_required, **kw)

    monkeypatch.setattr(mm, "load_models_gpu", record)
    g = comfy.samplers.CFGGuider(grad)
    g.set_conds(conds["edit"], conds["null"])
    g.set_cfg(GAMMA)
    seen = {}

    def fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        seen["estimate"] = model_k.inner_model.inner_model.memory_required(shape)
        return x

    with torch.inference_mode():
        g.sample(torch.zeros_like(latent["samples"]), latent["samples"], comfy.samplers.KSAMPLER(fn), sigmas,
                 disable_pbar=True, seed=0)
    copies = pc.weight_bytes(model.model.diffusion_model)
    assert seen["estimate"] >= pc.GRAD_ACTIVATION_FACTOR * plain + copies - 1
    assert len(calls) == 2 and calls[1] > calls[0] + copies  # the second load asks for the gradient estimate
    mm.unload_all_models()
    assert model.model.memory_required(shape) == plain  # the object patch left with the model


def test_prepare_sampling_wrapper_passes_through_what_it_does_not_use(world, monkeypatch):
    """ComfyUI 0.33 calls PREPARE_SAMPLING wrappers with ``force_full_load=`` / ``force_offload=``, and a later one may
    add more: the gradient-memory wrapper hands them on to ComfyUI, keeps ``force_full_load`` for its own reload and
    leaves a ``force_offload`` preparation as it is; the patched ``memory_required`` takes keywords it does not know."""
    import psedit_pack.nodes._comfy as pc

    model, conds, latent, sigmas = world
    grad = pc.differentiable_patcher(model)
    seen, loads = {}, []

    def executor(model_, noise_shape, conds_, *args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        return "real_model", {}, []

    executor.class_obj = None
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", lambda models, **kw: loads.append(kw))
    monkeypatch.setattr(comfy.sampler_helpers, "estimate_memory", lambda *a: (10.0, 5.0))
    kwargs = {"model_options": {}, "force_full_load": True, "force_offload": False, "a_future_keyword": 1}
    out = pc._prepare_with_grad_memory(executor, grad, [1, 4, 8, 8], {}, **kwargs)
    assert out == ("real_model", {}, []) and seen["kwargs"] == kwargs
    assert loads == [{"memory_required": 10.0, "minimum_memory_required": 5.0, "force_full_load": True}]
    pc._prepare_with_grad_memory(executor, grad, [1, 4, 8, 8], {}, force_offload=True)
    assert len(loads) == 1  # ComfyUI already offloads all it can
    memory_required = grad.get_model_object("memory_required")
    assert memory_required([2, 4, 64, 64], cond_shapes={}, memory_efficient_attention=True) > 0


def test_weight_wrapper_copies_what_autograd_must_not_share():
    """ComfyUI 0.33 may hand a layer's weight function a view of a shared cast buffer (offload streams, dynamic VRAM)
    or the resident inference tensor: with gradients on the wrapper copies those, so the next layer's cast cannot
    change what backward reads; a fresh copy, and every weight without gradients, is passed on as it is."""
    import psedit_pack.nodes._comfy as pc

    buffer = torch.randn(64)
    view = buffer[8:24].view(4, 4)
    with torch.inference_mode():
        resident = torch.randn(4, 4)
    fresh = torch.randn(4, 4)
    with torch.enable_grad():
        for weight in (view, resident):
            out = pc._frozen(weight)
            assert torch.equal(out, weight) and out.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
            assert not out.is_inference() and out._base is None
        assert pc._frozen(fresh).untyped_storage().data_ptr() == fresh.untyped_storage().data_ptr()
        copied = pc._frozen(view)
        buffer.zero_()  # the next layer's cast into the same buffer
        assert copied.abs().sum() > 0
    with torch.no_grad():
        assert pc._frozen(view).untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def test_gradient_forwards_use_comfys_differentiable_kernels(world):
    """Inside a gradient forward ComfyUI's ``in_training`` switch is on (0.33's Flux RoPE has no backward otherwise),
    and it is restored after."""
    import comfy.model_management as mm
    import psedit_pack.nodes._comfy as pc

    seen = []

    def executor(*args, **kwargs):
        seen.append(getattr(mm, "in_training", None))
        return args[0] * 2

    executor.class_obj = None
    before = getattr(mm, "in_training", None)
    x = torch.ones(2, requires_grad=True)
    with torch.enable_grad():
        pc._grad_forward(executor, x)
    with torch.no_grad():
        pc._grad_forward(executor, x)
    expected_on = True if hasattr(mm, "in_training") else None
    assert seen == [expected_on, before] and getattr(mm, "in_training", None) == before


def test_an_undifferentiable_patch_is_named_with_the_alternative(world, taesd_vae):
    """A third-party block patch that multiplies by a tensor it made under inference mode cannot be differentiated:
    full-gradient guidance and null-text inversion stop with a message naming gradient 'x0' / negative-prompt."""
    from psedit_pack.nodes.guidance import PerceptualGuidanceNode

    tiny.register_shared_weights()
    model, conds, latent, sigmas = world
    with torch.inference_mode():
        gain = torch.full((1,), 1.01)

    def input_patch(h, transformer_options):
        return h * gain

    m = model.clone()
    m.set_model_input_block_patch(input_patch)
    with torch.inference_mode():
        guided = PerceptualGuidanceNode.execute(triple(m, conds), taesd_vae, tiny.photo(64), 0.1, "alex", "full",
                                                "taesd", "normalized")[0]
        inv = DDIMInvert.execute(m, latent, sigmas, conds["source"], 1.0, 0)[1]
    with pytest.raises(RuntimeError, match="use gradient 'x0'"):
        sample(guided, latent, sigmas)
    with pytest.raises(RuntimeError, match="use method 'negative-prompt'"), torch.inference_mode():
        NullTextInversion.execute(m, inv, conds["null"], conds["source"], GAMMA, "null-text", 2, 1e-5, 0.01)
