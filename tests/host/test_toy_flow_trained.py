"""Host tier on the trained flow-matching twin (psedit_toy/weights/toy_sd3.safetensors): FlowEdit and PSEdit's flow
paths on a flow model that has learnt the toy world, against ground truth (issue 27's tests on a trained model).
Thresholds sit below values measured on this machine (written beside them) with the committed weights (step 20600:
colours and backgrounds learnt, shapes right in about six generations of seven, README: The toy world); the module
runs in about 25 s. It skips, saying so, where the weights file is missing."""

from __future__ import annotations

import numpy as np
import pytest
import tiny
import torch

try:
    tiny.load_pack()
except tiny.ComfyUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

import comfy.samplers  # noqa: E402
import comfy_extras.nodes_custom_sampler as ncs  # noqa: E402

from psedit_cli.pipeline import Settings, nodes  # noqa: E402
from psedit_toy import edits as E  # noqa: E402
from psedit_toy import flow_model as F  # noqa: E402
from psedit_toy import flow_rows as FR  # noqa: E402
from psedit_toy import model as M  # noqa: E402
from psedit_toy import run as R  # noqa: E402
from psedit_toy import scenes as S  # noqa: E402

STEPS = 20  # FlowEdit then runs the paper's 33/50 of them: 13
TOY_CFG = "flowedit@1,3"  # source / edit CFG for the toy twin (the paper's 3.5 / 13.5 over-saturate it: README)


@pytest.fixture(scope="module")
def world():
    if not F.WEIGHTS.is_file():
        pytest.skip(f"the flow twin's weights are not committed yet ({F.WEIGHTS}; python -m psedit_toy.train "
                    "--family flow, README: The toy world)")
    if not (tiny.WEIGHTS / "taesd" / "taesd_encoder.safetensors").is_file():
        pytest.skip(f"needs the real TAESD in {tiny.WEIGHTS / 'taesd'} (../shared/weights beside the checkout)")
    tiny.register_shared_weights()
    return R.World(*F.load(F.WEIGHTS, taesd=tiny.WEIGHTS / "taesd"))


@pytest.fixture(scope="module")
def colour_edits(world):
    """Four held-out colour edits, each with its conditioning and schedule (no inversion: FlowEdit needs none)."""
    s = Settings(steps=STEPS, lpips_net="squeeze")
    out = []
    version = M.manifest(F.WEIGHTS).get("data_version")  # the world the twin was trained on
    for edit in E.make_edits(1, 4, kinds=("colour",), version=version):
        src = S.render(edit.source)[0]
        out.append((edit, src, R.invert(world, src, edit.source_caption, edit.edit_caption, s, methods=())))
    return s, out


def flowedit(world, inv, s, config=TOY_CFG, mask=None):
    return FR.sample(world, inv, FR.guider(config, world, inv, s, mask=mask))


def photo_latent(world, inv) -> torch.Tensor:
    with torch.inference_mode():
        return world.vae.encode(inv.image)


@pytest.mark.parametrize("guidance", [1.0, 13.5])
def test_flowedit_with_the_source_caption_as_edit_returns_the_photo(world, colour_edits, guidance):
    """Both branches see the same caption: every velocity difference is 0 up to rounding. The rounding feeds back:
    the next step's velocity difference is the model's response to the error so far, which CFG multiplies, so the
    error grows with the scale and with how sharp the model is (1 -> 2.9e-6, 3.5 -> 1.2e-5, 7.5 -> 3.6e-5 /
    2.3e-4, 13.5 -> 1.0e-2 / 5.2e-3 on two edits, of a latent whose largest value is 12.7; float64 latents give the
    same to three digits, as the model computes in float32)."""
    s, edits = colour_edits
    _, _, inv = edits[0]
    with torch.inference_mode():
        g = nodes().flowedit.FlowEditGuiderNode.execute(world.model, inv.null, inv.source, inv.source, guidance,
                                                        guidance, 13, 0, 1, 0)[0]
        latent = photo_latent(world, inv)
        out = ncs.SamplerCustomAdvanced().sample(ncs.Noise_EmptyNoise(), g, comfy.samplers.sampler_object("euler"),
                                                 inv.sigmas, {"samples": latent})[0]["samples"]
    err = (out - latent).abs().max().item()
    # measured (max abs): guidance 1 -> 2.9e-6, 13.5 -> 1.0e-2 (the step-2500 probe: 1.9e-6, 2.2e-4)
    assert err < {1.0: 2e-5, 13.5: 3e-2}[guidance], err


def test_flowedit_edits_the_colour_and_keeps_the_background(world, colour_edits, record_property):
    s, edits = colour_edits
    reached, bg = 0, []
    for edit, src, inv in edits:
        img = flowedit(world, inv, s)
        reached += E.attribute_reached(edit, img)
        bg.append(E.psnr(img, src, ~edit.region()))
    record_property("flowedit", (reached, bg))
    # measured (step 20600): 4 of 4 reached, background PSNR 18.1 / 18.6 / 25.6 / 25.3 dB (mean 21.9; step 19600:
    # 4 of 4, mean 21.8)
    assert reached >= 3 and np.mean(bg) > 20.0, (reached, bg)


def test_a_masked_flowedit_keeps_the_photo_outside_the_mask(world, colour_edits, record_property):
    s, edits = colour_edits
    edit, src, inv = edits[0]
    region = edit.region()
    mask = torch.from_numpy(region.astype(np.float32))[None]
    guider = FR.guider("flowedit_masked_true@1,3", world, inv, s, mask=mask)
    with torch.inference_mode():
        latent = photo_latent(world, inv)
        out = ncs.SamplerCustomAdvanced().sample(ncs.Noise_EmptyNoise(), guider, comfy.samplers.sampler_object("euler"),
                                                 inv.sigmas, {"samples": latent})[0]["samples"]
        # the mask at latent resolution, as the node resizes it (8 px per latent cell): cells wholly outside
        small = torch.nn.functional.avg_pool2d(mask[None], 8)[0, 0] == 0
    outside_err = (out - latent)[..., small].abs().max().item()
    inside_change = (out - latent)[..., ~small].abs().mean().item()
    record_property("errors", (outside_err, inside_change))
    # measured (step 20600): outside 9.5e-7 max abs (float rounding), inside mean |change| 1.90 (step 19600: 2.31)
    assert outside_err < 1e-5, outside_err
    assert inside_change > 0.5, inside_change  # and inside, it edits


def test_perceptual_guidance_brings_flowedit_closer_to_the_photo(world, colour_edits, record_property):
    metrics = R.Metrics(nodes()._comfy.lpips_search_dirs())  # LPIPS AlexNet, the recommended metric
    s, edits = colour_edits
    lpips = {"flowedit": [], "flowedit+perceptual": []}
    for _, src, inv in edits:
        for config in lpips:
            lpips[config].append(float(metrics.lpips_map(flowedit(world, inv, s, TOY_CFG + config[8:]), src).mean()))
    record_property("lpips", lpips)
    # measured (step 20600): mean 0.445 -> 0.394 with 1 torch thread, both trees (step 19600: 0.465 -> 0.403; step
    # 17600: 0.444 -> 0.418 with 2 threads, -> 0.408 with 1). Single edits move with the thread count (step 17600,
    # edit 0: 0.570 / 0.517; edit 2 is 0.005 lower with 2 threads, 0.003 higher with 1): FlowEdit feeds every
    # difference in the velocities back into the next step (see the same-caption test), the last bits of the LPIPS
    # gradient included, so only the mean is asserted.
    assert np.mean(lpips["flowedit+perceptual"]) < np.mean(lpips["flowedit"]) - 0.02, lpips
