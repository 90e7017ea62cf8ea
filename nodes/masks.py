"""PSEdit Edit Mask: where the edit acts, estimated from the model (DiffEdit-style) or given by the user."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..psedit_core.masks import edit_mask, fit_mask, resize_mask
from . import _comfy
from .inversion import InversionType


def frames_as_channels(x):
    """``[B, C, T, h, w]`` (Qwen-Image's one-frame latents) as ``[B, C*T, h, w]``; 4-D as it is."""
    return x.flatten(1, 2) if x.ndim == 5 else x


def estimate_mask(model, payload, source, edit, probe_end: float, blur: float, threshold: float | None):
    """Accumulate ``|D_edit - D_src|`` at the inversion trajectory's first steps; a mask at latent resolution."""
    inversion = payload.inversion
    n_probe = max(1, round(probe_end * inversion.steps))
    progress = _comfy.Progress(n_probe)

    def probe(model_k, x, sigmas, extra_args, store):
        guider = model_k.inner_model
        conds = [guider.conds["positive"], guider.conds["negative"]]

        def pairs():
            for i in range(n_probe):
                latent = inversion.latents[i].to(x.device)
                sigma = sigmas[i] * latent.new_ones([latent.shape[0]])
                out = comfy.samplers.calc_cond_batch(guider.inner_model, conds, latent, sigma,
                                                     extra_args["model_options"])
                progress()
                yield frames_as_channels(out[0]), frames_as_channels(out[1])

        store["mask"] = edit_mask(pairs(), blur=blur, threshold=threshold)
        return x

    return _comfy.run_on_trajectory(model, payload, edit, source, 1.0, probe)["mask"]


class EditMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PSEditEditMask",
            display_name="PSEdit Edit Mask",
            category="PSEdit",
            description=(
                "Where the edit acts: the difference between the edit and source captions' predictions over the "
                "first steps of the inverted trajectory, blurred, normalised and thresholded (DiffEdit-style). "
                "Outputs a standard MASK (white = edit region) to preview, grow, blur or paint over with stock "
                "nodes, and to give PSEdit Perceptual Guidance so it protects only the rest. A connected mask is "
                "passed through instead."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The same MODEL that DDIM Invert used."),
                InversionType.Input("inversion", tooltip="The trajectory from PSEdit DDIM Invert."),
                io.Conditioning.Input("source", tooltip="The source caption: what the photo shows."),
                io.Conditioning.Input("edit", tooltip="The edit caption: what the photo should show."),
                io.Float.Input("probe_end", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="Probe the steps from the start up to this fraction of the schedule "
                               "(early, noisy steps show where the layout changes)."),
                io.Float.Input("blur", default=1.0, min=0.0, max=16.0, step=0.1,
                               tooltip="Gaussian blur radius, in latent pixels (1 latent pixel = 8 image pixels)."),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Cut-off on the normalised difference; lower gives a larger edit region."),
                io.Boolean.Input("soft", default=False,
                                 tooltip="Output the normalised difference itself (a soft mask) instead of a "
                                 "thresholded one."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Your own mask (white = edit region). When connected it is used instead of "
                              "the estimate: a mask painted on the photo is cropped as VAE Encode crops the photo, "
                              "one of another size must have the photo's aspect ratio (it is area-resized)."),
            ],
            outputs=[io.Mask.Output(
                "edit_mask", display_name="edit_mask", tooltip="White where the edit may change the image.")],
        )

    @classmethod
    def execute(cls, model, inversion, source, edit, probe_end, blur, threshold, soft, mask=None) -> io.NodeOutput:
        _comfy.check_supported(model, "PSEdit Edit Mask", extra_flow=True)
        latent = inversion.inversion.latents[-1]
        size = (latent.shape[-2] * _comfy.SPATIAL_RATIO, latent.shape[-1] * _comfy.SPATIAL_RATIO)
        if mask is not None:
            return io.NodeOutput(fit_mask(mask, size, _comfy.SPATIAL_RATIO)[:, 0].cpu())
        if inversion.family != _comfy.model_family(model):
            raise ValueError(
                f"the inversion was made with a {inversion.family} model but this MODEL is "
                f"{_comfy.model_family(model)}: connect the same MODEL to DDIM Invert and Edit Mask"
            )
        _comfy.check_conditioning(model, source, "source")
        _comfy.check_conditioning(model, edit, "edit")
        m = estimate_mask(model, inversion, source, edit, float(probe_end), float(blur),
                          None if soft else float(threshold))
        return io.NodeOutput(resize_mask(m, size, mode="bilinear" if soft else "nearest")[:, 0].cpu())
