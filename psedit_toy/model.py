"""The toy world's text-to-image model as ComfyUI objects: MODEL (ModelPatcher), CLIP (for CLIPTextEncode), VAE.

- UNet: ComfyUI's own ``UNetModel`` (SD1.5 family: eps prediction, SD1.5's discrete 1000-step schedule,
  ``comfy.supported_models.SD15`` latent format), narrow and shallow (1.7 M parameters), context
  width ``CONTEXT_DIM``. Attention at the 8x8 and 4x4 levels and the middle only: at 16x16 it costs 4x the
  whole rest of a training step on 2 CPU cores.
- Text: ComfyUI's SD1 tokenizer (CLIP BPE, shipped with ComfyUI) and its ``SDClipModel`` with a small
  ``CLIPTextModel`` config, so ``CLIPTextEncode`` drives it and token positions are the real SD1 ones.
- VAE: the real TAESD (SD1) from ``../shared/weights/taesd`` or ComfyUI's ``models/vae_approx``.

``load()`` returns the three objects from the committed weights (``weights/toy_sd15.safetensors``), or from any
weights file, built with the UNet configuration recorded in its manifest (:func:`manifest_path`: the
``manifest.json`` beside it; ``UNET_CONFIG``, the first model's, when it records none); a file whose manifest says
``"family": "flow"`` is the flow-matching twin's, handed to :func:`psedit_toy.flow_model.load`. ``UNET_CONFIG_V2``
(4.2 M parameters) widens the 4x4 level to 128 channels: the level where the caption's colour and shape meet the
object's layout, at a quarter of the 16x16 level's cost.
Needs a ComfyUI checkout importable (``comfy`` on ``sys.path``, CPU mode chosen before ``comfy.model_management``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "weights" / "toy_sd15.safetensors"
MANIFEST = HERE / "weights" / "manifest.json"
SHARED_TAESD = HERE.parents[1] / "shared" / "weights" / "taesd"
CONTEXT_DIM = 128

TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": CONTEXT_DIM, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 4 * CONTEXT_DIM, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 4,
    "num_hidden_layers": 2, "pad_token_id": 1, "projection_dim": CONTEXT_DIM, "vocab_size": 49408,
}

UNET_CONFIG = dict(
    model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=[1, 1, 1], transformer_depth=[0, 1, 1],
    transformer_depth_output=[0, 0, 1, 1, 1, 1], transformer_depth_middle=1, use_linear_in_transformer=True,
    use_spatial_transformer=True, legacy=False, in_channels=4, out_channels=4, use_checkpoint=False,
    use_temporal_attention=False, use_temporal_resblock=False, num_heads=-1, num_head_channels=32,
    image_size=16, context_dim=CONTEXT_DIM, adm_in_channels=None,
)
UNET_CONFIG_V2 = {**UNET_CONFIG, "channel_mult": [1, 2, 4]}
ARCHS = {"v1": UNET_CONFIG, "v2": UNET_CONFIG_V2}


def _clip_classes():
    import comfy.sd1_clip

    class ToyTextModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (ComfyUI's signature)
            super().__init__(device=device, dtype=dtype, model_options=model_options,
                             textmodel_json_config=dict(TEXT_CONFIG), return_projected_pooled=False)

    class ToyClip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):  # noqa: B006
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=ToyTextModel)

    return ToyClip


def build_clip(dtype: torch.dtype | None = torch.float32):
    """A ComfyUI CLIP: the real SD1 tokenizer and a small text model (uninitialised: load or init it)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, _clip_classes())
    options = {} if dtype is None else {"dtype": dtype}
    return comfy.sd.CLIP(target=target, model_options=options)


def build_model(dtype: torch.dtype = torch.float32, manual_cast: torch.dtype | None = None,
                unet_config: dict | None = None):
    """An SD1.5-family BaseModel (eps) with ``unet_config`` (default ``UNET_CONFIG``; uninitialised weights) in a
    ModelPatcher.

    ``dtype`` is the weights' storage dtype; ``manual_cast`` the compute dtype when it differs (ComfyUI's
    manual cast, what a GPU with fp16 weights and an fp32 compute path takes).
    """
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(unet_config or UNET_CONFIG))
    config.set_inference_dtype(dtype, manual_cast)
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def taesd_vae(folder: str | Path | None = None):
    """ComfyUI's TAESD (SD1) VAE from ``folder`` (default ../shared/weights/taesd, then models/vae_approx)."""
    import comfy.sd
    from safetensors.torch import load_file

    candidates = [Path(folder)] if folder else [SHARED_TAESD]
    if not folder:
        try:
            import folder_paths

            candidates += [Path(p) for p in folder_paths.get_folder_paths("vae_approx")]
        except Exception:  # noqa: BLE001 (folder_paths is optional outside a ComfyUI run)
            pass
    for c in candidates:
        if (c / "taesd_decoder.safetensors").is_file() and (c / "taesd_encoder.safetensors").is_file():
            sd = {f"taesd_{part}.{k}": v for part in ("encoder", "decoder")
                  for k, v in load_file(str(c / f"taesd_{part}.safetensors")).items()}
            sd["vae_scale"], sd["vae_shift"] = torch.tensor(0.18215), torch.tensor(0.0)
            return comfy.sd.VAE(sd=sd)
    raise FileNotFoundError(
        "the toy world needs TAESD (SD1): taesd_encoder.safetensors and taesd_decoder.safetensors from "
        f"https://github.com/madebyollin/taesd in one of {[str(c) for c in candidates]}")


def split_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The file's keys: ``model.diffusion_model.*`` (UNet) and ``cond_stage_model.*`` (text model)."""
    unet = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    text = {k[len("cond_stage_model."):]: v for k, v in sd.items() if k.startswith("cond_stage_model.")}
    return unet, text


def load(path: str | Path = WEIGHTS, taesd: str | Path | None = None, dtype: torch.dtype = torch.float32,
         manual_cast: torch.dtype | None = None):
    """(MODEL, CLIP, VAE) of the trained toy world, as CheckpointLoaderSimple would hand them to a graph; the flow
    twin's (:func:`psedit_toy.flow_model.load`) where the file's manifest says ``"family": "flow"``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: train it with `python -m psedit_toy.train` (see README)")
    info = manifest(path)
    if info.get("family", "eps") == "flow":
        from . import flow_model

        return flow_model.load(path, taesd, dtype, manual_cast)
    if info.get("text_config", TEXT_CONFIG) != TEXT_CONFIG:
        raise RuntimeError(f"{path}: its manifest's text_config differs from this version's TEXT_CONFIG")
    unet_sd, text_sd = split_state_dict(load_file(str(path)))
    patcher = build_model(dtype, manual_cast, info.get("unet_config", UNET_CONFIG))
    missing, unexpected = patcher.model.diffusion_model.load_state_dict(
        {k: v.to(dtype) for k, v in unet_sd.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path}: UNet keys do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    clip = build_clip()
    missing, unexpected = clip.cond_stage_model.load_state_dict(text_sd, strict=False)
    missing = [k for k in missing if not k.endswith("logit_scale")]
    if missing or unexpected:
        raise RuntimeError(f"{path}: text model keys do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return patcher, clip, taesd_vae(taesd)


def manifest_path(weights: str | Path = WEIGHTS) -> Path:
    """A weights file's manifest: ``<stem>.json`` beside it where there is one (one per model: the flow twin's
    ``toy_sd3.json``), else the folder's ``manifest.json`` (the eps model's, as first committed)."""
    own = Path(weights).with_suffix(".json")
    return own if own.is_file() else Path(weights).parent / "manifest.json"


def manifest(weights: str | Path = WEIGHTS) -> dict:
    """The manifest of a weights file (:func:`manifest_path`; {} when there is none). ``family`` is "flow" for the
    flow-matching twin (:mod:`psedit_toy.flow_model`) and absent for the eps model."""
    path = manifest_path(weights)
    return json.loads(path.read_text()) if path.is_file() else {}
