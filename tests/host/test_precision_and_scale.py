"""Host tier: the gradient paths at a user's precision and the cost of the step lookups (issue: null-text and
perceptual guidance at a real photo's size and precision). Tiny SD1.5 UNets whose weights are stored in fp16 or
bf16, with half-precision kernels on the CPU (what a GPU runs) or ComfyUI's manual cast, built under
``torch.inference_mode()`` as ComfyUI's executor builds them."""

from __future__ import annotations

import pytest
import tiny
import torch
from torch.utils._python_dispatch import TorchDispatchMode

try:
    tiny.load_pack()
except tiny.ComfyUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

import comfy.samplers  # noqa: E402
import comfy_extras.nodes_custom_sampler as ncs  # noqa: E402
from psedit_pack.nodes.guidance import StepWindowNode, TripleGuiderNode  # noqa: E402
from psedit_pack.nodes.inversion import DDIMInvert  # noqa: E402
from psedit_pack.nodes.nulltext import NullTextInversion  # noqa: E402


def build(dtype, manual_cast=None):
    with torch.inference_mode():
        return tiny.build_tiny("sd15", "eps", dtype=dtype, manual_cast=manual_cast)


def conds():
    return {n: tiny.conditioning("sd15", s) for s, n in enumerate(("null", "source", "edit"))}


def sample(guider, latent, sigmas):
    with torch.inference_mode():
        return ncs.SamplerCustomAdvanced().sample(ncs.Noise_EmptyNoise(), guider,
                                                 comfy.samplers.sampler_object("euler"), sigmas, latent)[0]["samples"]


def invert(model, c, size=32, steps=10, batch=1):
    g = torch.Generator().manual_seed(7)
    latent = {"samples": torch.randn(batch, 4, size, size, generator=g)}
    with torch.inference_mode():
        sigmas = ncs.BasicScheduler().get_sigmas(model, "normal", steps, 1.0)[0]
        inverted, payload = DDIMInvert.execute(model, latent, sigmas, c["source"], 1.0, 2)
    return latent, sigmas, inverted, payload


def regenerate(model, c, schedule, inverted, sigmas):
    with torch.inference_mode():
        g = TripleGuiderNode.execute(model, c["null"], c["source"], c["source"], 7.5, 0.0, None, schedule)[0]
    return sample(g, inverted, sigmas)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype,manual_cast", [(torch.float16, None), (torch.bfloat16, None),
                                               (torch.float16, torch.float32)],
                         ids=["fp16", "bf16", "fp16-manual-cast"])
def test_null_text_in_half_precision_updates_every_step(dtype, manual_cast):
    """At 32x32 latents (a 256-px photo) the old mean-reduced loss lost the fp16 gradient on the last steps."""
    model, c = build(dtype, manual_cast), conds()
    latent, sigmas, inverted, payload = invert(model, c)
    with torch.inference_mode():
        nti = NullTextInversion.execute(model, payload, c["null"], c["source"], 7.5, "null-text", 5, 0.0, 0.01)[0]
    nulls = [c["null"][0][0]] + [cond[0][0] for cond in nti.conds]
    moved = [(b.float() - a.float()).abs().max().item() for a, b in zip(nulls, nulls[1:], strict=False)]
    assert min(moved) > 1e-3, moved  # Adam's steps are about lr = 0.01 wherever the gradient survives
    plain = rel_err(regenerate(model, c, None, inverted, sigmas), latent["samples"])
    fitted = rel_err(regenerate(model, c, nti, inverted, sigmas), latent["samples"])
    assert fitted < plain / 2, (plain, fitted)


def test_null_text_gives_each_batch_member_its_own_embedding():
    model, c = build(torch.float32), conds()
    latent, sigmas, inverted, payload = invert(model, c, size=16, steps=6, batch=2)
    with torch.inference_mode():
        nti = NullTextInversion.execute(model, payload, c["null"], c["source"], 7.5, "null-text", 5, 0.0, 0.01)[0]
    last = nti.conds[-1][0][0]
    assert last.shape[0] == 2 and (last[0] - last[1]).abs().max() > 1e-3


def test_null_text_completes_150_steps():
    model, c = build(torch.float32), conds()
    latent, sigmas, inverted, payload = invert(model, c, size=8, steps=150)
    with torch.inference_mode():
        nti = NullTextInversion.execute(model, payload, c["null"], c["source"], 7.5, "null-text", 1, 0.0, 0.01)[0]
    assert len(nti.conds) == 150


class ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (``.item()``, ``float()``, ``bool()``): each one waits for
    the GPU. ``tolist`` of a whole schedule counts once."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_windows_and_null_schedule_make_few_scalar_reads_per_model_call(record_property):
    model, c = build(torch.float32), conds()
    steps = 20
    latent, sigmas, inverted, payload = invert(model, c, size=8, steps=steps)
    with torch.inference_mode():
        npi = NullTextInversion.execute(model, payload, c["null"], c["source"], 7.5, "negative-prompt", 0, 0.0,
                                        0.01)[0]
        window = StepWindowNode.execute(0.0, 0.4)[0]
        triple = TripleGuiderNode.execute(model, c["null"], c["source"], c["edit"], 7.5, 3.0, window, npi)[0]
        stock = comfy.samplers.CFGGuider(model)
        stock.set_conds(c["edit"], c["null"])
        stock.set_cfg(7.5)
    counts = {}
    for name, guider in (("stock", stock), ("triple", triple)):
        mode = ScalarReads()
        with mode:
            sample(guider, inverted, sigmas)
        counts[name] = mode.count
    per_call = (counts["triple"] - counts["stock"]) / steps
    record_property("scalar_reads", counts)
    # measured: stock 2 reads in 20 calls; triple with window and null schedule 42, 2 per call (was 105+ per call)
    assert per_call <= 3, counts


# --- weights ComfyUI keeps on the offload device (lowvram) -----------------------------------------------------------

@pytest.fixture
def lowvram(monkeypatch):
    """ComfyUI's low-VRAM partial loading, forced on the CPU: load_models_gpu treats the device as a GPU with no
    room (``NO_VRAM``), so every layer keeps its weight on the offload device and casts it per forward (the path a
    GPU takes when the model does not fit)."""
    import comfy.model_management as mm

    mm.unload_all_models()
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
    monkeypatch.setattr(mm, "is_device_cpu", lambda device: False)
    loaded = []
    real = mm.LoadedModel.model_load

    def record(self, lowvram_model_memory=0, force_patch_weights=False):
        loaded.append(lowvram_model_memory)
        return real(self, lowvram_model_memory, force_patch_weights)

    monkeypatch.setattr(mm.LoadedModel, "model_load", record)
    yield loaded
    mm.unload_all_models()


def null_text_result(model, c, payload):
    with torch.inference_mode():
        nti = NullTextInversion.execute(model, payload, c["null"], c["source"], 7.5, "null-text", 3, 0.0, 0.01)[0]
    return torch.stack([cond[0][0] for cond in nti.conds])


def test_null_text_with_partially_loaded_weights_matches_a_full_load(lowvram):
    model, c = build(torch.float16, torch.float32), conds()
    latent, sigmas, inverted, payload = invert(model, c, size=16, steps=6)
    partial = null_text_result(model, c, payload)
    assert lowvram and all(0 < m < 1 for m in lowvram), lowvram  # every load was a partial (lowvram) one
    lowvram.clear()
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.vram_state = mm.VRAMState.DISABLED  # restored by monkeypatch
    full = null_text_result(model, c, payload)
    assert lowvram and all(m == 0 for m in lowvram), lowvram
    assert rel_err(partial, full) < 1e-5


@pytest.mark.parametrize("dtype,manual_cast", [(torch.float16, None), (torch.bfloat16, None),
                                               (torch.float16, torch.float32)],
                         ids=["fp16", "bf16", "fp16-manual-cast"])
def test_full_gradient_perceptual_guidance_in_half_precision_and_lowvram(lowvram, taesd_vae, dtype, manual_cast):
    """Perceptual guidance 'full' differentiates a half-precision UNet whose weights stay on the offload device:
    finite, and it moves the result (the gradient reached the latent)."""
    from psedit_pack.nodes.guidance import PerceptualGuidanceNode

    tiny.register_shared_weights()
    model, c = build(dtype, manual_cast), conds()
    latent, sigmas, inverted, payload = invert(model, c, size=8, steps=6)
    image = tiny.photo(64)
    with torch.inference_mode():
        triple = TripleGuiderNode.execute(model, c["null"], c["source"], c["edit"], 7.5, 3.0)[0]
        guided = PerceptualGuidanceNode.execute(triple, taesd_vae, image, 0.3, "alex", "full", "taesd",
                                                "normalized")[0]
    plain, corrected = sample(triple, inverted, sigmas), sample(guided, inverted, sigmas)
    assert lowvram and all(0 < m < 1 for m in lowvram), lowvram
    assert torch.isfinite(corrected).all()
    assert rel_err(corrected, plain) > 1e-2


def test_a_latent_far_from_the_native_size_is_logged_once(caplog):
    """Over 2.5x or under a quarter of the native area warns, once per size (a 4000x3000 photo is 46x)."""
    model, c = build(torch.float32), conds()
    small = {"samples": torch.randn(1, 4, 16, 24)}  # 192x128 pixels: a tenth of SD1.5's 512x512
    with torch.inference_mode():
        sigmas = ncs.BasicScheduler().get_sigmas(model, "normal", 2, 1.0)[0]
        with caplog.at_level("WARNING"):
            DDIMInvert.execute(model, small, sigmas, c["source"], 1.0, 0)
            DDIMInvert.execute(model, small, sigmas, c["source"], 1.0, 0)
            DDIMInvert.execute(model, {"samples": torch.randn(1, 4, 32, 48)}, sigmas, c["source"], 1.0, 0)  # 0.38x
    warnings = [r.getMessage() for r in caplog.records if "native" in r.getMessage()]
    assert len(warnings) == 1 and "192x128" in warnings[0] and "ImageScaleToTotalPixels" in warnings[0], warnings
