"""Host tier: PSEdit on flow-matching models (issue 11) the way ComfyUI runs them: tiny SD3 (MMDiT-X) and Flux dev
built from ComfyUI's own classes under inference mode, sampled by the stock SamplerCustomAdvanced; the handover of
the inverted latent for every model sampling type; and the refusal of every other model family.

The real TAESD3 / TAEF1 decoders are not in ../shared/weights: perceptual guidance runs through ComfyUI's TAESD
``Decoder`` with random weights written to a temporary ``vae_approx`` folder under the real file names, and through a
random-weight SD3 VAE (ComfyUI's ``AutoencodingEngine``, 16 channels); the LPIPS trunks are the real ones.
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
import comfy_extras.nodes_custom_sampler as ncs  # noqa: E402
import folder_paths  # noqa: E402
from psedit_pack.nodes import _comfy  # noqa: E402
from psedit_pack.nodes.flux import FluxGuiderNode  # noqa: E402
from psedit_pack.nodes.guidance import PerceptualGuidanceNode, StepWindowNode, TripleGuiderNode  # noqa: E402
from psedit_pack.nodes.inversion import DDIMInvert, InvertedNoiseNode  # noqa: E402
from psedit_pack.nodes.masks import EditMask  # noqa: E402
from psedit_pack.nodes.nulltext import NullTextInversion  # noqa: E402
from psedit_pack.psedit_core.inversion import vp_input_scale  # noqa: E402

GUIDANCE = 3.5  # Flux dev's usual FluxGuidance


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow(request):
    family = request.param
    model = tiny.build_tiny_flow(family)
    g = GUIDANCE if family == "flux" else None
    conds = {name: tiny.flow_conditioning(family, seed, guidance=g)
             for seed, name in enumerate(("null", "source", "edit"))}
    return family, model, conds


@pytest.fixture(scope="module")
def sd3():
    return tiny.build_tiny_flow("sd3"), {n: tiny.flow_conditioning("sd3", s)
                                         for s, n in enumerate(("null", "source", "edit"))}


@pytest.fixture(scope="module")
def flux():
    return tiny.build_tiny_flow("flux"), {n: tiny.flow_conditioning("flux", s, guidance=GUIDANCE)
                                          for s, n in enumerate(("null", "source", "edit"))}


def sigmas_for(model, steps=10, scheduler="simple"):
    with torch.inference_mode():
        return ncs.BasicScheduler().get_sigmas(model, scheduler, steps, 1.0)[0]


def sample(guider, latent, sigmas, noise=None, sampler="euler"):
    with torch.inference_mode():
        return ncs.SamplerCustomAdvanced().sample(
            noise or ncs.Noise_EmptyNoise(), guider, comfy.samplers.sampler_object(sampler), sigmas, latent
        )[0]["samples"]


def plain_guider(model, cond):
    g = comfy.samplers.CFGGuider(model)
    g.set_conds(cond, cond)
    g.set_cfg(1.0)
    return g


def invert(model, latent, sigmas, source, refine=0, convention="start"):
    with torch.inference_mode():
        inverted, payload = DDIMInvert.execute(model, latent, sigmas, source, 1.0, refine, convention=convention)
        noise = InvertedNoiseNode.execute(payload)[0]
    return inverted, payload, noise


def random_latent(seed=0, size=8, channels=16):
    return {"samples": torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(seed))}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# --- inversion and its handover --------------------------------------------------------------------------------------

def test_invert_then_sample_reconstructs_on_flow_models(flow):
    """Stock euler through SamplerCustomAdvanced from PSEdit Inverted Noise: plain inversion is first-order close,
    refinement exact; DisableNoise with the inverted LATENT (the SD1.x/SDXL handover) starts a flow model from zeros.
    Measured (10 steps, 'simple', start convention): SD3 plain 1.6e-2 / refined 2.8e-6, Flux 1.8e-1 / 3.1e-3
    (relative error; benchmarks/flow_models.py)."""
    family, model, conds = flow
    latent = random_latent(0, size=16)
    original = latent["samples"].clone()
    sigmas = sigmas_for(model)
    assert float(sigmas[0]) == 1.0
    errors = {}
    for convention in ("start", "target"):
        for refine in (0, 3):
            inverted, payload, noise = invert(model, latent, sigmas, conds["source"], refine, convention)
            out = sample(plain_guider(model, conds["source"]), inverted, sigmas, noise)
            errors[convention, refine] = rel_err(out, original)
    assert torch.equal(latent["samples"], original)  # input untouched
    for convention in ("start", "target"):
        assert errors[convention, 3] < 0.01 and errors[convention, 3] < errors[convention, 0] / 5, errors
    disabled = sample(plain_guider(model, conds["source"]), inverted, sigmas)
    assert rel_err(disabled, original) > 0.5  # why flow models need the Inverted Noise


def test_flow_target_convention_is_the_latent_unchanged(sd3):
    """A flow model's input is the latent itself (calculate_input is the identity): the target convention's scale
    is 1, while an eps model's is the VP rescaling of psedit_core.inversion eq. 4."""
    model, _ = sd3
    eps = tiny.build_tiny("sd15", "eps")
    a, b = torch.tensor(0.5), torch.tensor(0.75)
    assert _comfy.inversion_input_scale(model)(a, b) == 1.0
    assert torch.allclose(_comfy.inversion_input_scale(eps)(torch.tensor(2.0), torch.tensor(5.0)),
                          vp_input_scale(torch.tensor(2.0), torch.tensor(5.0)))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_inverted_noise_is_disable_noise_on_sd15(prediction):
    """On eps/v models the Inverted Noise with the inverted LATENT is the existing handover (zero noise), and it
    hands over the same start with the photo's own latent as latent_image."""
    model = tiny.build_tiny("sd15", prediction)
    source, null = tiny.conditioning("sd15", 1), tiny.conditioning("sd15", 0)
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))}
    sigmas = sigmas_for(model, 10, "normal")
    inverted, payload, noise = invert(model, latent, sigmas, source, 2)
    assert noise.generate_noise(inverted).abs().max() < 1e-6  # zero up to process_in(process_out(x))
    g = comfy.samplers.CFGGuider(model)
    g.set_conds(source, null)
    g.set_cfg(1.0)
    old = sample(g, inverted, sigmas)
    assert rel_err(sample(g, inverted, sigmas, noise), old) < 1e-6
    assert rel_err(sample(g, latent, sigmas, noise), old) < 1e-5
    assert rel_err(old, latent["samples"]) < 0.05


def test_inverted_noise_works_with_any_latent_image(flow):
    """The noise is solved against the LATENT it is sampled with (noise_scaling is affine in it): the inverted
    latent, the photo's latent or an empty latent all start the sampler at the inverted latent, also below sigma 1."""
    family, model, conds = flow
    latent = random_latent(2)
    for sigmas in (sigmas_for(model), sigmas_for(model, 12)[2:]):  # the second starts below sigma 1
        inverted, payload, noise = invert(model, latent, sigmas, conds["source"], 3)
        outs = [sample(plain_guider(model, conds["source"]), lat, sigmas, noise)
                for lat in (inverted, latent, {"samples": torch.zeros_like(latent["samples"])})]
        for out in outs:
            assert rel_err(out, latent["samples"]) < 0.01
    with pytest.raises(ValueError, match="connect DDIM Invert's inverted LATENT"):
        noise.generate_noise(random_latent(3, size=16))


def test_psedit_guiders_refuse_a_zero_start_on_flow_models(sd3, flux):
    for model, conds in (sd3, flux):
        latent, sigmas = random_latent(4), sigmas_for(model)
        inverted, _, _ = invert(model, latent, sigmas, conds["source"])
        with torch.inference_mode():
            if _comfy.is_guidance_distilled(model):
                guider = FluxGuiderNode.execute(model, conds["source"], conds["edit"], GUIDANCE, 1.4)[0]
            else:
                guider = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 4.5, 1.8)[0]
        with pytest.raises(ValueError, match="Connect PSEdit Inverted Noise"):
            sample(guider, inverted, sigmas)


# --- SD3 / SD3.5: triple guidance and null-text inversion ------------------------------------------------------------

def test_triple_guider_on_sd3_equals_dual_cfg(sd3):
    model, conds = sd3
    latent, sigmas = random_latent(5), sigmas_for(model)
    inverted, _, noise = invert(model, latent, sigmas, conds["source"])
    with torch.inference_mode():
        triple = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 4.5, 1.8)[0]
        dual = ncs.DualCFGGuider().get_guider(model, conds["edit"], conds["source"], conds["null"], 1.8, 4.5,
                                              "regular")[0]
    a, b = sample(triple, inverted, sigmas, noise), sample(dual, inverted, sigmas, noise)
    assert rel_err(a, b) < 1e-5
    assert rel_err(a, sample(plain_guider(model, conds["source"]), inverted, sigmas, noise)) > 1e-2


def test_null_text_inversion_on_sd3_optimises_tokens_and_pooled(sd3):
    """SD3's conditioning: one token sequence holding CLIP-L/G and T5 outputs, and a pooled CLIP vector that modulates
    every block. optimise 'all' (default) optimises both, 'tokens' the sequence alone. On the tiny SD3 at gamma 5
    (10 steps, 10 iterations; measured: plain 0.85, tokens 0.67, all 0.15, negative-prompt 3e-6) the pooled vector
    is what lets the null follow the source."""
    model, conds = sd3
    latent, sigmas = random_latent(0, size=16), sigmas_for(model)
    inverted, payload, noise = invert(model, latent, sigmas, conds["source"], 3)

    def regenerate(schedule):
        with torch.inference_mode():
            g = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 5.0, 0.0, None,
                                         schedule)[0]
        return rel_err(sample(g, inverted, sigmas, noise), latent["samples"])

    with torch.inference_mode():
        npi = NullTextInversion.execute(model, payload, conds["null"], conds["source"], 5.0, "negative-prompt", 10,
                                        1e-5, 0.01)[0]
        both = NullTextInversion.execute(model, payload, conds["null"], conds["source"], 5.0, "null-text", 10, 1e-5,
                                         0.01)[0]
        tokens = NullTextInversion.execute(model, payload, conds["null"], conds["source"], 5.0, "null-text", 10,
                                           1e-5, 0.01, optimise="tokens")[0]
    null_tokens, null_pooled = conds["null"][0][0], conds["null"][0][1]["pooled_output"]
    for step in both.conds:
        assert step[0][0].shape == null_tokens.shape and (step[0][0] - null_tokens).abs().max() > 1e-4
        assert (step[0][1]["pooled_output"] - null_pooled).abs().max() > 1e-4
    for step in tokens.conds:
        assert (step[0][0] - null_tokens).abs().max() > 1e-4
        assert torch.equal(step[0][1]["pooled_output"], null_pooled)
    plain, e_npi, e_both, e_tokens = regenerate(None), regenerate(npi), regenerate(both), regenerate(tokens)
    assert e_npi < 1e-3 and e_both < plain / 3 and e_both < e_tokens < plain, (plain, e_npi, e_tokens, e_both)


# --- Flux: guidance-distilled text guidance -------------------------------------------------------------------------

def test_flux_guider_is_cfg_from_source_to_edit(flux):
    """e_g(src) + (beta / g) (e_g(edit) - e_g(src)): the stock CFGGuider with the source as negative and scale
    beta / g, both captions at Flux guidance g; beta = 0 reconstructs the photo, beta = g is the edit caption alone."""
    import node_helpers

    model, conds = flux
    latent, sigmas = random_latent(6, size=16), sigmas_for(model)
    inverted, _, noise = invert(model, latent, sigmas, conds["source"], 3)
    at_g = {k: node_helpers.conditioning_set_values(v, {"guidance": GUIDANCE}) for k, v in conds.items()}

    def flux_guider(beta, window=None):
        with torch.inference_mode():
            return FluxGuiderNode.execute(model, conds["source"], conds["edit"], GUIDANCE, beta, window)[0]

    stock = comfy.samplers.CFGGuider(model)
    stock.set_conds(at_g["edit"], at_g["source"])
    stock.set_cfg(1.4 / GUIDANCE)
    edited = sample(flux_guider(1.4), inverted, sigmas, noise)
    assert rel_err(edited, sample(stock, inverted, sigmas, noise)) < 1e-5
    assert rel_err(edited, latent["samples"]) > 0.05  # it edits
    assert rel_err(sample(flux_guider(0.0), inverted, sigmas, noise), latent["samples"]) < 0.01
    edit_only = sample(plain_guider(model, at_g["edit"]), inverted, sigmas, noise)
    assert rel_err(sample(flux_guider(GUIDANCE), inverted, sigmas, noise), edit_only) < 1e-5
    with torch.inference_mode():
        late = StepWindowNode.execute(0.5, 1.0)[0]
    windowed = sample(flux_guider(0.0, late), inverted, sigmas, noise)  # edit caption first, then the source
    assert 1e-3 < rel_err(windowed, latent["samples"]) and rel_err(windowed, edit_only) > 1e-3


def test_flux_refuses_what_needs_an_unconditional_branch(flux, sd3):
    model, conds = flux
    latent, sigmas = random_latent(7), sigmas_for(model)
    _, payload, _ = invert(model, latent, sigmas, conds["source"])
    with torch.inference_mode():
        with pytest.raises(ValueError, match="use PSEdit Flux Guider"):
            TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 3.5, 1.4)
        with pytest.raises(ValueError, match="remove Null-Text Inversion"):
            NullTextInversion.execute(model, payload, conds["null"], conds["source"], 3.5, "null-text", 2, 1e-5, 0.01)
        with pytest.raises(ValueError, match="set cfg to 1"):
            DDIMInvert.execute(model, latent, sigmas, conds["source"], 3.5, 0, conds["null"])
        with pytest.raises(ValueError, match="use PSEdit Triple Guider"):
            FluxGuiderNode.execute(sd3[0], sd3[1]["source"], sd3[1]["edit"], 3.5, 1.4)
        with pytest.raises(ValueError, match="pooled output of width 2048 but this Flux model expects 768"):
            DDIMInvert.execute(model, latent, sigmas, sd3[1]["source"], 1.0, 0)
        with pytest.raises(ValueError, match="width 768 but this SD3 model expects 4096"):
            DDIMInvert.execute(sd3[0], latent, sigmas, tiny.conditioning("sd15", 0), 1.0, 0)


# --- perceptual and masked guidance through 16-channel decoders ------------------------------------------------------

@pytest.fixture(scope="module")
def flow_decoders(tmp_path_factory):
    """Random-weight taesd3_decoder / taef1_decoder files in a vae_approx folder, a random SD3 VAE, real LPIPS."""
    if not (tiny.WEIGHTS / "lpips" / "vgg16_features.pth").is_file():
        pytest.skip(f"needs the real LPIPS trunks in {tiny.WEIGHTS / 'lpips'}")
    folder = tmp_path_factory.mktemp("vae_approx")
    tiny.random_taesd_decoder(folder, "taesd3_decoder", seed=1)
    tiny.random_taesd_decoder(folder, "taef1_decoder", seed=2)
    tiny.register_shared_weights()
    folder_paths.add_model_folder_path("vae_approx", str(folder))
    return tiny.random_sd3_vae()


def decoded_lpips(model, vae, decoder, image, samples):
    """LPIPS (alex) between the photo and ``samples`` decoded by the guidance's own decoder."""
    from psedit_pack.psedit_core.lpips_loader import get_lpips
    from psedit_pack.psedit_core.metrics import lpips_distance

    alex = get_lpips("alex", search_dirs=[tiny.WEIGHTS / "lpips"], allow_download=False)
    with torch.inference_mode():
        x0 = _comfy.latent_format(model).process_in(samples)
        decoded = _comfy.make_decoder(model, vae, decoder)(x0)
    return lpips_distance(alex, decoded.clamp(0, 1), image.movedim(-1, 1)).item()


@pytest.mark.parametrize("decoder", ["taesd", "vae"])
def test_perceptual_guidance_on_flow_models(flow, flow_decoders, decoder):
    """Through the SD3/Flux VAE architecture (16 channels) or TAESD3 / TAEF1 (random weights): guidance lowers its
    LPIPS to the photo. Measured (alex, strength 0.3, target latent, 10 steps): SD3 0.76 -> 0.68 (TAESD3),
    0.60 -> 0.41 (VAE); Flux 0.67 -> 0.40 (TAEF1), 0.62 -> 0.41 (VAE)."""
    family, model, conds = flow
    vae = flow_decoders
    image = tiny.photo(64)
    with torch.inference_mode():
        latent = {"samples": vae.encode(image)}
    sigmas = sigmas_for(model)
    inverted, payload, noise = invert(model, latent, sigmas, conds["source"], 2)
    with torch.inference_mode():
        if family == "flux":
            guider = FluxGuiderNode.execute(model, conds["source"], conds["edit"], GUIDANCE, GUIDANCE)[0]
        else:
            guider = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 4.5, 4.5)[0]
        guided = PerceptualGuidanceNode.execute(guider, vae, image, 0.3, "alex", "x0", decoder, "normalized",
                                                target="latent")[0]
    plain_lp = decoded_lpips(model, vae, decoder, image, sample(guider, inverted, sigmas, noise))
    guided_lp = decoded_lpips(model, vae, decoder, image, sample(guided, inverted, sigmas, noise))
    assert guided_lp < 0.93 * plain_lp, (plain_lp, guided_lp)


def test_edit_mask_and_masked_guidance_on_flow_models(flow, flow_decoders):
    family, model, conds = flow
    vae = flow_decoders
    image = tiny.photo(64)
    with torch.inference_mode():
        latent = {"samples": vae.encode(image)}
    sigmas = sigmas_for(model)
    inverted, payload, noise = invert(model, latent, sigmas, conds["source"], 2)
    with torch.inference_mode():
        mask = EditMask.execute(model, payload, conds["source"], conds["edit"], 0.5, 1.0, 0.5, False)[0]
        same = EditMask.execute(model, payload, conds["source"], conds["source"], 0.5, 1.0, 0.5, False)[0]
        if family == "flux":
            guider = FluxGuiderNode.execute(model, conds["source"], conds["edit"], GUIDANCE, GUIDANCE)[0]
        else:
            guider = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 4.5, 4.5)[0]
        region = torch.zeros(1, 64, 64)
        region[:, :, :32] = 1
        masked = PerceptualGuidanceNode.execute(guider, vae, image, 0.3, "alex", "x0", "taesd", "normalized",
                                                mask=region)[0]
    assert mask.shape == (1, 64, 64) and set(mask.unique().tolist()) <= {0.0, 1.0} and 0 < mask.mean() < 1
    assert same.abs().sum() == 0
    plain, out = sample(guider, inverted, sigmas, noise), sample(masked, inverted, sigmas, noise)
    assert torch.isfinite(out).all() and rel_err(out, plain) > 1e-3


def test_gradients_through_flux_are_exact(flux):
    """Flux's blocks add into tensors they saved for backward (``x += ...``): gradient-enabled patchers run it with
    autograd keeping copies. The gradient matches a central finite difference of the same ComfyUI evaluation."""
    model, conds = flux
    grad_model = _comfy.differentiable_patcher(model)
    guider = comfy.samplers.CFGGuider(grad_model)
    guider.set_conds(conds["source"], conds["source"])
    guider.set_cfg(1.0)
    g = torch.Generator().manual_seed(8)
    x0, w, v = (torch.randn(1, 16, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    seen = {}

    def fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        sigma = sigmas[2].clone() * x.new_ones([1])
        with torch.inference_mode(False), torch.enable_grad():
            xi = x0.float().detach().clone().requires_grad_(True)
            (seen["grad"],) = torch.autograd.grad((model_k(xi, sigma, **extra_args) * w.float()).sum(), xi)
        with torch.no_grad():
            h = 1e-2
            f = [(model_k((x0 + s * h * v).float(), sigma, **extra_args).double() * w).sum() for s in (1, -1)]
            seen["fd"] = float((f[0] - f[1]) / (2 * h))
        return x

    with torch.inference_mode():
        guider.sample(torch.zeros(1, 16, 8, 8), torch.zeros(1, 16, 8, 8), comfy.samplers.KSAMPLER(fn),
                      sigmas_for(model), disable_pbar=True, seed=0)
    analytic = float((seen["grad"].double() * v).sum())
    assert abs(analytic - seen["fd"]) < 2e-2 * abs(seen["fd"]) + 1e-3, (analytic, seen["fd"])


@pytest.mark.parametrize("decoder", ["taesd", "vae"])
def test_full_gradient_perceptual_guidance_on_flow_models(flow, flow_decoders, decoder):
    family, model, conds = flow
    vae = flow_decoders
    image = tiny.photo(64)
    with torch.inference_mode():
        latent = {"samples": vae.encode(image)}
    sigmas = sigmas_for(model, 6)
    inverted, payload, noise = invert(model, latent, sigmas, conds["source"], 1)
    with torch.inference_mode():
        if family == "flux":
            guider = FluxGuiderNode.execute(model, conds["source"], conds["edit"], GUIDANCE, GUIDANCE)[0]
        else:
            guider = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 4.5, 4.5)[0]
        guided = PerceptualGuidanceNode.execute(guider, vae, image, 0.3, "alex", "full", decoder, "normalized",
                                                target="latent")[0]
    plain_lp = decoded_lpips(model, vae, decoder, image, sample(guider, inverted, sigmas, noise))
    guided_lp = decoded_lpips(model, vae, decoder, image, sample(guided, inverted, sigmas, noise))
    assert guided_lp < plain_lp, (plain_lp, guided_lp)


# --- every other family stops at the first PSEdit node ----------------------------------------------------------------

@pytest.mark.parametrize("kind", tiny.UNSUPPORTED)
def test_unsupported_families_are_refused(kind):
    """Video (Wan 2.1), Stable Cascade, AuraFlow and Flux schnell: each PSEdit node that takes a model stops with a
    message naming the supported families, before any work."""
    model = tiny.build_tiny_unsupported(kind)
    cond = tiny.flow_conditioning("sd3", 0)
    latent = {"samples": torch.randn(1, 16, 8, 8)}
    sigmas = torch.linspace(1, 0, 5)
    supported = r"supports SD1\.x, SD2\.x, SDXL \(also Playground v2\.5\), SD3 / SD3\.5 and Flux\.1 dev"
    guider = comfy.samplers.CFGGuider(model)
    calls = [
        lambda: DDIMInvert.execute(model, latent, sigmas, cond, 1.0, 0),
        lambda: TripleGuiderNode.execute(model, cond, cond, cond, 7.5, 3.0),
        lambda: FluxGuiderNode.execute(model, cond, cond, 3.5, 1.4),
        lambda: PerceptualGuidanceNode.execute(guider, None, tiny.photo(64), 0.1, "vgg", "x0", "taesd", "normalized"),
        lambda: NullTextInversion.execute(model, None, cond, cond, 7.5, "null-text", 2, 1e-5, 0.01),
        lambda: EditMask.execute(model, None, cond, cond, 0.5, 1.0, 0.5, False),
    ]
    with torch.inference_mode():
        for call in calls:
            with pytest.raises(ValueError, match=supported) as info:
                call()
            assert type(model.model.model_config).__name__ in str(info.value)


# --- the example workflows run ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,family", [("psedit_edit_sd35", "sd3"), ("psedit_edit_flux", "flux"),
                                         ("psedit_flowedit_sd35", "sd3"), ("psedit_flowedit_flux", "flux")])
def test_flow_workflow_runs_on_a_tiny_model(name, family, flow_decoders):
    """The example workflow's API-format twin (as the frontend sends it), executed node by node with the real node
    classes under inference mode. Only what needs real weights is stood in for: the checkpoint (tiny model, random
    SD3 VAE), the text encoder (random conditioning per caption) and the photo; the photo is scaled to 64x64 and the
    steps cut to 4 (null-text: 2 iterations) to fit the tiny model and the CPU."""
    import comfy_extras.nodes_flux as nflux
    import comfy_extras.nodes_post_processing as npp
    from _comfy_env import run_api_workflow
    from psedit_pack.nodes import NODES

    import nodes as comfy_nodes

    classes = {n.define_schema().node_id: n for n in NODES}
    classes.update(FluxGuidance=nflux.FluxGuidance, ImageScaleToTotalPixels=npp.ImageScaleToTotalPixels,
                   BasicScheduler=ncs.BasicScheduler, KSamplerSelect=ncs.KSamplerSelect,
                   SamplerCustomAdvanced=ncs.SamplerCustomAdvanced, VAEEncode=comfy_nodes.VAEEncode,
                   VAEDecode=comfy_nodes.VAEDecode)
    overrides = {"ImageScaleToTotalPixels": {"megapixels": 64 * 64 / 2**20}, "BasicScheduler": {"steps": 4},
                 "PSEditNullTextInversion": {"inner_iterations": 2}}
    model, vae = tiny.build_tiny_flow(family), flow_decoders
    texts = {}

    def stand_in(kind, inputs):
        if kind == "CheckpointLoaderSimple":
            return model, None, vae
        if kind == "CLIPTextEncode":
            return (tiny.flow_conditioning(family, texts.setdefault(inputs["text"], len(texts))),)
        if kind == "LoadImage":
            return tiny.photo(96), torch.zeros(1, 96, 96)
        return None

    classes.update(DisableNoise=ncs.DisableNoise)
    if "flowedit" in name:  # the paper's n_max counts from the end of its schedule: run all 4 steps here
        overrides["PSEditFlowEditGuider" if family == "sd3" else "PSEditFlowEditFluxGuider"] = {"n_max": 4}
    saved, ran = run_api_workflow(name, classes, stand_in, overrides)
    assert len(saved) == 1 and saved[0].shape == (1, 64, 64, 3) and torch.isfinite(saved[0]).all()
    if "flowedit" in name:  # no inversion at all: the photo's latent, DisableNoise, the FlowEdit guider
        guider = "PSEditFlowEditFluxGuider" if family == "flux" else "PSEditFlowEditGuider"
        assert {guider, "DisableNoise", "SamplerCustomAdvanced"} <= set(ran)
        assert not {"PSEditDDIMInvert", "PSEditInvertedNoise", "PSEditNullTextInversion"} & set(ran)
        return
    assert {"PSEditDDIMInvert", "PSEditInvertedNoise", "PSEditPerceptualGuidance", "SamplerCustomAdvanced"} <= set(ran)
    assert ("PSEditFluxGuider" if family == "flux" else "PSEditNullTextInversion") in ran
