"""The toy world's flow-matching twin: an SD3-family model (rectified flow) as ComfyUI objects (MODEL, CLIP, VAE).

Notation (ComfyUI's ``CONST`` model sampling, model latent space, the SD3 paper's rectified flow):

    x0        z0                  the scene's latent, ``latent_format.process_in`` of TAESD's encoding (16x16x4)
    eps       epsilon             standard normal noise
    sigma     t                   noise level in [0, 1]; sampling runs from sigma = 1 (pure noise) to 0
    x         z_t                 ``(1 - sigma) x0 + sigma eps``                                        (1)
    v         v_theta(z_t, t, c)  the network's output, trained towards ``eps - x0``                    (2)
    denoised  x0_hat              ``x - sigma v`` (``CONST.calculate_denoised``)                        (3)

- Network: ComfyUI's own MMDiT (``comfy.ldm.modules.diffusionmodules.mmdit``, the SD3 / SD3.5 transformer) inside
  ``comfy.model_base.SD3`` (model sampling ``CONST`` + ``ModelSamplingDiscreteFlow`` with SD3's shift 3.0, real
  CFG). Its config is ``comfy.supported_models.SD3``'s, with one change: the latent format is SD1.5's (4 channels,
  scale 0.18215, TAESD SD1 for previews and Perceptual Guidance), because the VAE is the same real TAESD (SD1) the
  eps model uses. The config class stays ``SD3`` (PSEdit's supported-family check reads it); the latent format, set
  on the instance, is :func:`latent_format_class`'s ``ToySD3``, SD1.5's under its own name, because PSEdit names a
  model's family by its latent format (messages, the check that an inversion is the same model's), so the twin is
  never taken for the eps model. 2x2 patches of the 16x16 latent give 64 image tokens beside the 77 text tokens; the
  position table (fixed 2D sin-cos, a buffer saved with the weights) covers a 16x16 patch grid, so latents up to
  32x32 (256-px images) fit, centre-cropped as SD3 crops its 192x192 table.
- Text: the eps model's (``psedit_toy.model.build_clip``: ComfyUI's SD1 tokenizer and ``SDClipModel`` around a
  2-layer, 128-wide ``CLIPTextModel``), its own weights trained jointly from scratch. The token sequence (77 x 128)
  goes through the MMDiT's ``context_embedder`` (Linear 128 -> hidden); the pooled vector (SD3's ``y``, through
  ``y_embedder`` into the timestep modulation) is what ``SDClipModel`` returns with ``return_projected_pooled=False``:
  the final-layer-normed hidden state at the first end-of-text token (128 wide, no projection). So
  ``CLIPTextEncode`` gives CONDITIONING ``[[tokens [1, 77, 128], {"pooled_output": [1, 128]}]]`` and
  ``model_base.SD3.extra_conds`` turns them into ``c_crossattn`` and ``y`` as it does for SD3's CLIP-L/G + T5.
- VAE: the real TAESD (SD1), :func:`psedit_toy.model.taesd_vae`.

:func:`load` returns the three from the committed weights (``weights/toy_sd3.safetensors``, fp16) or any weights
file, with the MMDiT configuration its manifest (``<stem>.json`` beside it) records. Training:
``python -m psedit_toy.train --family flow`` (:mod:`psedit_toy.train`).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from . import model as M

log = logging.getLogger(__name__)

WEIGHTS = M.HERE / "weights" / "toy_sd3.safetensors"
HEAD_DIM = 64  # ComfyUI's MMDiT: hidden = 64 * depth, heads = depth
POS_SIDE = 16  # patches per side of the position table: latents up to 32x32
POOLED_DIM = M.TEXT_CONFIG["hidden_size"]  # the EOS hidden state, unprojected


def mmdit_config(heads: int, blocks: int, qk_norm: str | None = "rms") -> dict:
    """An SD3-family MMDiT on 4-channel latents: ``blocks`` joint blocks of width ``64 * heads`` (``heads`` heads of
    64, ComfyUI's ``depth``), 2x2 patches, the toy text model's token width and pooled width, RMS q/k norms (SD3.5's,
    which keep attention logits bounded when training from scratch)."""
    hidden = HEAD_DIM * heads
    return dict(
        in_channels=4, out_channels=4, patch_size=2, depth=heads, num_blocks=blocks, input_size=None,
        adm_in_channels=POOLED_DIM,
        context_embedder_config={"target": "torch.nn.Linear",
                                 "params": {"in_features": M.CONTEXT_DIM, "out_features": hidden}},
        num_patches=POS_SIDE * POS_SIDE, pos_embed_max_size=POS_SIDE, pos_embed_scaling_factor=None,
        qk_norm=qk_norm, x_block_self_attn_layers=[],
    )


# name -> MMDiT config (``python -m psedit_toy.train --family flow --arch NAME``). s1: hidden 128 (2 heads), 6 joint
# blocks, 3.49 M parameters; a training step of batch 64 (with the text model) takes 1.6 s on one CPU thread of this
# 2-core machine with the other core busy. The 77 text tokens, which run through every block's context stream, are
# over half its tokens: hidden 192 x 6 blocks (7.8 M) takes 3.0 s, hidden 256 x 4 (9.0 M) 2.5 s (MMDiT alone).
ARCHS = {"s1": mmdit_config(heads=2, blocks=6)}
DEFAULT_ARCH = "s1"


@functools.cache
def latent_format_class() -> type:
    """``ToySD3``: ``comfy.latent_formats.SD15`` (its numbers and TAESD decoder name) under the twin's name."""
    import comfy.latent_formats

    class ToySD3(comfy.latent_formats.SD15):
        """SD1.5's latent format, as the SD3-family toy twin's."""

    return ToySD3


def build_model(dtype: torch.dtype = torch.float32, manual_cast: torch.dtype | None = None,
                mmdit: dict | None = None):
    """An SD3-family BaseModel (``CONST`` flow matching, shift 3) with the ``mmdit`` config (default
    ``ARCHS[DEFAULT_ARCH]``) on SD1.5-format latents, uninitialised apart from its position table, in a
    ModelPatcher. ``dtype`` / ``manual_cast`` as :func:`psedit_toy.model.build_model`."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD3(dict(mmdit or ARCHS[DEFAULT_ARCH]))
    config.latent_format = latent_format_class()()  # an instance, as BASE.__init__ makes one
    config.set_inference_dtype(dtype, manual_cast)
    model = config.get_model({})
    set_position_table(model.diffusion_model)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def set_position_table(net: torch.nn.Module) -> None:
    """Fill the MMDiT's ``pos_embed`` buffer (allocated empty) with the fixed 2D sin-cos table SD3 ships."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed_torch

    side = net.pos_embed_max_size
    table = get_2d_sincos_pos_embed_torch(net.hidden_size, side, side, device=net.pos_embed.device)
    with torch.no_grad():
        net.pos_embed.copy_(table[None].to(net.pos_embed.dtype))


def init_weights(net: torch.nn.Module) -> None:
    """DiT's initialisation ("adaLN-Zero"), for training from scratch: Xavier-uniform linear and patch weights,
    zero biases, RMS norm gains 1, the timestep MLP N(0, 0.02), and every modulation and the output layer zero, so
    each block starts as the identity and the velocity as 0."""
    with torch.no_grad():
        for name, prm in net.named_parameters():
            if prm.ndim == 1:
                prm.fill_(1.0 if name.endswith(("ln_q.weight", "ln_k.weight")) else 0.0)
            elif name.startswith("t_embedder."):
                prm.normal_(0, 0.02)
            elif "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                prm.zero_()
            else:
                torch.nn.init.xavier_uniform_(prm.view(prm.shape[0], -1))
    set_position_table(net)


def pooled_index(ids: list[int]) -> int:
    """Where ``SDClipModel`` reads the pooled vector: the first end-of-text token (``num_tokens - 1``)."""
    return ids.index(M.TEXT_CONFIG["eos_token_id"])


def load(path: str | Path = WEIGHTS, taesd: str | Path | None = None, dtype: torch.dtype = torch.float32,
         manual_cast: torch.dtype | None = None):
    """(MODEL, CLIP, VAE) of the trained flow twin, built under ``torch.inference_mode()`` as ComfyUI's executor
    builds what a loader node returns (weights are inference tensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: train it with `python -m psedit_toy.train --family flow` "
                                "(see README)")
    info = M.manifest(path)
    if info.get("family") != "flow":
        raise RuntimeError(f"{path}: its manifest ({M.manifest_path(path).name}) is not a flow model's (family "
                           f"{info.get('family', 'eps')!r}): load it with psedit_toy.model.load")
    if info.get("text_config", M.TEXT_CONFIG) != M.TEXT_CONFIG:
        raise RuntimeError(f"{path}: its manifest's text_config differs from this version's TEXT_CONFIG")
    with torch.inference_mode():
        net_sd, text_sd = M.split_state_dict(load_file(str(path)))
        patcher = build_model(dtype, manual_cast, info.get("mmdit_config") or ARCHS[DEFAULT_ARCH])
        missing, unexpected = patcher.model.diffusion_model.load_state_dict(
            {k: v.to(dtype) for k, v in net_sd.items()}, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{path}: MMDiT keys do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
        set_position_table(patcher.model.diffusion_model)  # the file's copy is fp16: the exact table trained with
        clip = M.build_clip()
        missing, unexpected = clip.cond_stage_model.load_state_dict(text_sd, strict=False)
        missing = [k for k in missing if not k.endswith("logit_scale")]
        if missing or unexpected:
            raise RuntimeError(f"{path}: text model keys do not match (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
        return patcher, clip, M.taesd_vae(taesd)
