"""Host-tier helpers: a real ComfyUI (COMFYUI_PATH), tiny SD-architecture models built in code, the real TAESD.

Also used by ``benchmarks/`` (which put this folder on ``sys.path``). Nothing here downloads anything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO.parent / "shared" / "weights"
PACK_NAME = "psedit_pack"


class ComfyUnavailable(RuntimeError):
    pass


def comfy_path() -> Path:
    path = os.environ.get("COMFYUI_PATH")
    if not path or not (Path(path) / "comfy" / "model_management.py").is_file():
        raise ComfyUnavailable("set COMFYUI_PATH to a ComfyUI checkout to run host tests")
    return Path(path)


def workflow(name: str) -> dict:
    """The example workflow with id ``name`` (a key of tools/make_workflows.py's WORKFLOWS, e.g. psedit_edit_sd15) as
    saved in example_workflows/, under the readable title the generator's ``path_of`` gives it."""
    return json.loads(_workflow_generator().path_of(name).read_text())


def host_object_info() -> dict:
    """The node schemas of the ComfyUI at COMFYUI_PATH: its version's snapshot (tests/data/object_info/), or the
    newest one for a version without a snapshot."""
    sys.path.insert(0, str(REPO / "tests" / "workflows"))
    import snapshots

    version = snapshots.host_version(comfy_path())
    return snapshots.load(version if version in snapshots.versions() else snapshots.newest())


def _workflow_generator():
    """tools/make_workflows.py, imported once (it reads tests/data/object_info.json, nothing else)."""
    if "make_workflows" not in sys.modules:
        spec = importlib.util.spec_from_file_location("make_workflows", REPO / "tools" / "make_workflows.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["make_workflows"] = module
    return sys.modules["make_workflows"]


def import_comfy():
    """Put ComfyUI on ``sys.path`` in CPU mode (before ``comfy.model_management`` is imported) and return it."""
    root = str(comfy_path())
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True
    import comfy.model_management  # noqa: F401  (initialised in the mode chosen above)

    return root


def load_pack():
    """Import the repository the way ComfyUI imports a custom node folder (a package from its ``__init__.py``)."""
    import_comfy()
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    importlib.import_module(f"{PACK_NAME}.nodes")
    return module


def init_random(module: torch.nn.Module, seed: int, std: float) -> None:
    """Deterministic random weights (ComfyUI's layers start uninitialised): N(0, std^2); norms whose parameter name
    contains "norm" at identity.

    The UNet's ResBlock GroupNorms (``in_layers.0``, ``out_layers.0``) and the final ``out.0`` do not match and keep
    small random gains. That is load-bearing: with every GroupNorm at identity the random UNet is far less smooth
    and DDIM inversion of it no longer reconstructs (tests/host/test_nodes.py fails at std 0.04 and at 0.02).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.dtype.is_floating_point:
                continue
            if p.ndim == 1 and "norm" in name:
                p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _unet_config(family: str) -> dict:
    cfg = dict(
        model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[1, 1],
        transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, use_linear_in_transformer=False,
        use_spatial_transformer=True, legacy=False, in_channels=4, out_channels=4, use_checkpoint=False,
        use_temporal_attention=False, use_temporal_resblock=False, num_heads=-1, num_head_channels=32,
        image_size=32, context_dim=768, adm_in_channels=None,
    )
    if family == "sdxl":
        cfg.update(context_dim=2048, adm_in_channels=2816, use_linear_in_transformer=True, num_classes="sequential",
                   model_channels=64)
    return cfg


def build_tiny(family: str = "sd15", prediction: str = "eps", seed: int = 0, size: str = "tiny", std: float = 0.04,
               dtype: torch.dtype = torch.float32, manual_cast: torch.dtype | None = None, inference: bool = True):
    """A ModelPatcher around an SD1.5- or SDXL-architecture UNet with deterministic random weights.

    ``size="full"`` builds the full SD1.5 UNet (860 M parameters) or SDXL UNet (2.6 B) for benchmarks. ``dtype``
    is the weights' storage dtype and ``manual_cast`` the compute dtype when it differs (ComfyUI's manual cast: fp16
    weights computed in fp32, or, with ``manual_cast=None``, half-precision kernels as on a GPU). The weights are
    drawn in fp32 and then cast, so every dtype holds the same model (full size: drawn in the storage dtype). With
    ``inference`` (the default) the model is built under ``torch.inference_mode()``, as ComfyUI's executor builds
    every model, so its weights are inference tensors that autograd cannot save.
    """
    with torch.inference_mode(inference):
        return _build_tiny(family, prediction, seed, size, std, dtype, manual_cast)


def _build_tiny(family, prediction, seed, size, std, dtype, manual_cast):
    import_comfy()
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    if size == "full" and family == "sdxl":
        unet = dict(
            model_channels=320, channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2],
            transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
            transformer_depth_middle=10, use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False,
            in_channels=4, out_channels=4, use_checkpoint=False, use_temporal_attention=False,
            use_temporal_resblock=False, num_heads=-1, num_head_channels=64, image_size=32, context_dim=2048,
            adm_in_channels=2816, num_classes="sequential",
        )
    elif size == "full":
        unet = dict(
            model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
            transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            transformer_depth_middle=1, use_linear_in_transformer=False, use_spatial_transformer=True,
            legacy=False, in_channels=4, out_channels=4, use_checkpoint=False, use_temporal_attention=False,
            use_temporal_resblock=False, num_heads=8, num_head_channels=-1, image_size=32, context_dim=768,
            adm_in_channels=None,
        )
    else:
        unet = _unet_config(family)
    config_cls = comfy.supported_models.SDXL if family == "sdxl" else comfy.supported_models.SD15
    model_config = config_cls(unet)
    model_config.set_inference_dtype(dtype, manual_cast)
    model_type = comfy.model_base.ModelType.V_PREDICTION if prediction == "v" else comfy.model_base.ModelType.EPS
    model_cls = comfy.model_base.SDXL if family == "sdxl" else comfy.model_base.BaseModel
    model = model_cls(model_config, model_type=model_type)
    if dtype == torch.float32 or size == "full":  # full size: drawn in the storage dtype (no fp32 twin in memory)
        init_random(model, seed, std)
    else:
        reference = model_cls(model_config, model_type=model_type).float()
        init_random(reference, seed, std)
        with torch.no_grad():
            for p, q in zip(model.parameters(), reference.parameters(), strict=True):
                p.copy_(q.to(p.dtype))
    cpu = torch.device("cpu")
    if size == "full":  # benchmarks: loaded where ComfyUI would load it (the GPU when there is one)
        import comfy.model_management

        return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                                offload_device=cpu)
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def conditioning(family: str, seed: int, tokens: int = 77):
    """CONDITIONING as CLIPTextEncode makes it, with deterministic random embeddings (no text encoder)."""
    g = torch.Generator().manual_seed(1000 + seed)
    width = 2048 if family == "sdxl" else 768
    extra = {}
    if family == "sdxl":
        extra["pooled_output"] = torch.randn(1, 1280, generator=g)
    return [[torch.randn(1, tokens, width, generator=g), extra]]


def taesd_vae(family: str = "sd15"):
    """A ComfyUI VAE from the real TAESD files in ../shared/weights (None when they are absent)."""
    import_comfy()
    import comfy.sd
    from safetensors.torch import load_file

    name = "taesdxl" if family == "sdxl" else "taesd"
    folder = WEIGHTS / "taesd"
    if not (folder / f"{name}_decoder.safetensors").is_file():
        return None
    sd = {}
    for part in ("encoder", "decoder"):
        for k, v in load_file(str(folder / f"{name}_{part}.safetensors")).items():
            sd[f"taesd_{part}.{k}"] = v
    sd["vae_scale"] = torch.tensor(0.13025 if family == "sdxl" else 0.18215)
    sd["vae_shift"] = torch.tensor(0.0)
    with torch.inference_mode():  # as VAELoader runs inside ComfyUI's executor
        return comfy.sd.VAE(sd=sd)


def build_tiny_controlnet(family: str = "sd15", seed: int = 7, std: float = 0.04):
    """A ``comfy.controlnet.ControlNet`` whose control model matches :func:`build_tiny`'s UNet, random weights
    (zero convolutions included, so it changes the prediction), built under ``torch.inference_mode()`` as
    ControlNetLoader builds it; apply it with the stock Apply ControlNet nodes and a hint IMAGE."""
    import_comfy()
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    config = _unet_config(family)
    config.pop("out_channels")
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                  device=torch.device("cpu"))
    with torch.inference_mode():
        control_model = comfy.cldm.cldm.ControlNet(**config)
        init_random(control_model, seed, std)
        return comfy.controlnet.ControlNet(control_model, load_device=torch.device("cpu"))


class _TinyAdapterNet(torch.nn.Module):
    """A T2I adapter body for :func:`build_tiny`'s SD1.5 UNet: plain torch layers, as ComfyUI's ``Adapter`` has,
    with one feature for each of the UNet's two resolutions (``input`` residuals popped from the end)."""

    unshuffle_amount = 8

    def __init__(self):
        super().__init__()
        self.unshuffle = torch.nn.PixelUnshuffle(8)
        self.conv_in = torch.nn.Conv2d(3 * 64, 32, 3, padding=1)
        self.down = torch.nn.Conv2d(32, 64, 3, stride=2, padding=1)

    def forward(self, x):
        f0 = self.conv_in(self.unshuffle(x))
        f1 = self.down(torch.nn.functional.silu(f0))
        return {"input": [f1, None, f0, None]}


def build_tiny_t2i_adapter(seed: int = 11, std: float = 0.04):
    """A ``comfy.controlnet.T2IAdapter`` around :class:`_TinyAdapterNet` (random weights, built under inference
    mode as ControlNetLoader builds a T2I adapter); apply it with the stock Apply ControlNet nodes."""
    import_comfy()
    import comfy.controlnet

    with torch.inference_mode():
        net = _TinyAdapterNet()
        init_random(net, seed, std)
        return comfy.controlnet.T2IAdapter(net, 3, 8, "nearest-exact", device=torch.device("cpu"))


def random_sd_vae(seed: int = 0, std: float = 0.02):
    """A ComfyUI VAE with the full SD1.x AutoencoderKL architecture and random weights (for cost benchmarks)."""
    import_comfy()
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    model = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    init_random(model, seed, std)
    return comfy.sd.VAE(sd=model.state_dict())


def random_sd15_checkpoint(path, seed: int = 0) -> None:
    """Save a full-size SD1.5 checkpoint (UNet, CLIP-L text encoder, SD VAE) with random weights, in the layout
    ComfyUI's CheckpointLoaderSimple detects (about 4 GB in fp32)."""
    import_comfy()
    import comfy.sd
    import comfy.supported_models

    model = build_tiny("sd15", size="full", seed=seed, std=0.02)
    clip = comfy.sd.CLIP(target=comfy.supported_models.SD15({}).clip_target())
    init_random(clip.cond_stage_model, seed + 1, 0.02)
    comfy.sd.save_checkpoint(str(path), model, clip, random_sd_vae(seed + 2))


def register_shared_weights():
    """Point ComfyUI's vae_approx and lpips model folders at ../shared/weights (as a user's models/ would be)."""
    import folder_paths

    folder_paths.add_model_folder_path("vae_approx", str(WEIGHTS / "taesd"))
    folder_paths.add_model_folder_path("lpips", str(WEIGHTS / "lpips"))


def photo(size: int = 64, batch: int = 1) -> torch.Tensor:
    """A real photo (scikit-image's astronaut) as a ComfyUI IMAGE [B, H, W, 3] in [0, 1]."""
    import numpy as np
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((size, size), Image.LANCZOS)
    t = torch.from_numpy(np.array(img)).float()[None] / 255
    return t.expand(batch, -1, -1, -1).contiguous()


# --- flow-matching models (SD3 / SD3.5 MMDiT, Flux) ---------------------------------------------------------------

FLOW_CONTEXT = 4096  # T5-XXL width: both families take their token sequence at this width
FLOW_POOLED = {"sd3": 2048, "flux": 768}  # CLIP-L + CLIP-G pooled (SD3), CLIP-L pooled (Flux)
FLOW_TOKENS = {"sd3": 154, "flux": 256}  # SD3: 77 CLIP-L/G + 77 T5 tokens; Flux: 256 T5 tokens


def _sd3_config(size: str = "tiny", blocks: tuple[int, int] | None = None) -> dict:
    """An SD3.5-medium-shaped MMDiT-X: RMS q/k norms, extra image self-attention in the first blocks, a position
    embedding table. ``tiny``: 2 joint blocks (hidden 128, 2 heads of 64), 16x16 patches (latents up to 32x32);
    ``small`` (benchmarks on a CPU): 8 blocks, hidden 512; ``full``: SD3.5 Medium itself (24 blocks, hidden 1536,
    2.5 B parameters, 384x384 patches). ``blocks = (a, b)`` keeps the width of ``size`` but builds only ``a`` blocks
    with the extra self-attention and ``b`` without (a slice, for cost estimates per block)."""
    depth, side, self_attn = {"tiny": (2, 16, [0]), "small": (8, 64, list(range(4))),
                              "full": (24, 384, list(range(13)))}[size]
    extra = {}
    if blocks is not None:
        self_attn, extra = list(range(blocks[0])), {"num_blocks": blocks[0] + blocks[1]}
    return dict(
        **extra, in_channels=16, out_channels=16, patch_size=2, depth=depth, input_size=None,
        adm_in_channels=FLOW_POOLED["sd3"],
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": FLOW_CONTEXT,
                                                                          "out_features": 64 * depth}},
        num_patches=side * side, pos_embed_max_size=side, qk_norm="rms", pos_embed_scaling_factor=None,
        x_block_self_attn_layers=self_attn,
    )


def _flux_config(guidance_embed: bool = True, size: str = "tiny", blocks: tuple[int, int] | None = None) -> dict:
    """A Flux-shaped double/single-stream transformer with guidance embedding (Flux dev) unless ``guidance_embed``
    is False. ``tiny``: hidden 64, 2 heads (rotary axes 4+14+14), one double and one single block; ``small``
    (benchmarks on a CPU): hidden 512, 4 heads, 2 double and 4 single blocks; ``full``: Flux.1 dev itself (hidden
    3072, 24 heads, 19 double and 38 single blocks, 12 B parameters). ``blocks = (double, single)`` keeps the width
    of ``size`` with that many blocks of each kind (a slice, for cost estimates per block)."""
    hidden, heads, depth, single, axes = {"tiny": (64, 2, 1, 1, [4, 14, 14]), "small": (512, 4, 2, 4, [16, 56, 56]),
                                          "full": (3072, 24, 19, 38, [16, 56, 56])}[size]
    if blocks is not None:
        depth, single = blocks
    config = dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=FLOW_POOLED["flux"],
        context_in_dim=FLOW_CONTEXT, hidden_size=hidden, mlp_ratio=4.0, num_heads=heads, depth=depth,
        depth_single_blocks=single, axes_dim=axes, theta=10000, patch_size=2, qkv_bias=True,
        guidance_embed=guidance_embed,
    )
    return {**config, **_flux_params_since_0_33()}


def _flux_params_since_0_33() -> dict:
    """What ComfyUI's model detection adds for Flux.1 where its ``FluxParams`` has the field (0.33: ``txt_ids_dims``,
    empty for Flux.1, the text positions carrying no ids); nothing on older ComfyUI."""
    import dataclasses

    import comfy.ldm.flux.model

    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return {"txt_ids_dims": []} if "txt_ids_dims" in fields else {}


def build_tiny_flow(family: str = "sd3", seed: int = 0, std: float = 0.05, inference: bool = True,
                    size: str = "tiny", dtype: torch.dtype = torch.float32, blocks: tuple[int, int] | None = None):
    """A ModelPatcher around a tiny SD3 (MMDiT, ``comfy.supported_models.SD3``, model sampling ``CONST`` +
    ``ModelSamplingDiscreteFlow`` shift 3) or Flux dev (``comfy.supported_models.Flux``, ``CONST`` +
    ``ModelSamplingFlux``, guidance-distilled) built from ComfyUI's own classes with deterministic random weights,
    under ``torch.inference_mode()`` as ComfyUI's executor builds every model. ``size`` "small" / "full" build the
    benchmark architectures (:func:`_sd3_config`, :func:`_flux_config`; "full" is for a GPU: 2.5 B / 12 B
    parameters), stored as ``dtype``; ``blocks`` builds a slice of that width (:func:`_sd3_config`,
    :func:`_flux_config`)."""
    with torch.inference_mode(inference):
        import_comfy()
        import comfy.model_base
        import comfy.model_patcher
        import comfy.supported_models

        if family == "sd3":
            config = comfy.supported_models.SD3(_sd3_config(size, blocks))
        elif family == "flux":
            config = comfy.supported_models.Flux(_flux_config(size=size, blocks=blocks))
        else:
            raise ValueError(f"family must be 'sd3' or 'flux', got {family!r}")
        config.set_inference_dtype(dtype, None)
        model = config.get_model({})
        init_random(model, seed, std)
        if family == "sd3":  # a buffer, which init_random leaves as allocated: SD3's fixed 2D sin-cos embedding
            from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed_torch

            net = model.diffusion_model
            side = net.pos_embed_max_size
            net.pos_embed.copy_(get_2d_sincos_pos_embed_torch(net.hidden_size, side, side)[None])
        device = torch.device("cpu")
        return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def flow_conditioning(family: str, seed: int, tokens: int | None = None, guidance: float | None = None):
    """CONDITIONING as CLIPTextEncode makes it for SD3 (token sequence [1, 154, 4096], pooled [1, 2048]) or Flux
    ([1, 256, 4096], pooled [1, 768]; ``guidance`` as FluxGuidance sets it), random but deterministic in ``seed``."""
    g = torch.Generator().manual_seed(2000 + seed)
    extra = {"pooled_output": torch.randn(1, FLOW_POOLED[family], generator=g)}
    if guidance is not None:
        extra["guidance"] = guidance
    return [[torch.randn(1, tokens or FLOW_TOKENS[family], FLOW_CONTEXT, generator=g), extra]]


def cfg_guider(model, positive, negative, cfg: float):
    """The stock CFGGuider (what the CFGGuider node builds)."""
    import comfy.samplers

    g = comfy.samplers.CFGGuider(model)
    g.set_conds(positive, negative)
    g.set_cfg(cfg)
    return g


QWEN_CONTEXT = 64  # the tiny Qwen-Image's text width (the real one: 3584, Qwen2.5-VL 7B)


def build_tiny_qwen(seed: int = 0, std: float = 0.1, dtype: torch.dtype = torch.float32):
    """A ModelPatcher around a tiny Qwen-Image transformer (``comfy.supported_models.QwenImage``: flow matching,
    ``ModelSamplingFlux``, Wan 2.1 latents ``[B, 16, 1, h, w]``), random weights, built under inference mode (about
    0.1 s to build; one FlowEdit step at 16x16 takes ~10 ms)."""
    with torch.inference_mode():
        import_comfy()
        import comfy.model_patcher
        import comfy.supported_models

        config = comfy.supported_models.QwenImage(dict(
            image_model="qwen_image", in_channels=64, out_channels=16, num_layers=1, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=QWEN_CONTEXT, axes_dims_rope=(8, 12, 12)))
        config.set_inference_dtype(dtype, None)
        model = config.get_model({})
        init_random(model, seed, std)  # at 0.05 the one-block model hardly reads its caption
        cpu = torch.device("cpu")
        return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def qwen_conditioning(seed: int):
    """CONDITIONING as the Qwen-Image text encoder makes it (a token sequence, no pooled vector), random but
    deterministic in ``seed``."""
    g = torch.Generator().manual_seed(3000 + seed)
    return [[torch.randn(1, 12, QWEN_CONTEXT, generator=g), {}]]


def qwen_world(dtype: torch.dtype = torch.float32):
    """The tiny Qwen-Image (:func:`build_tiny_qwen`) and its null / source / edit conditionings."""
    return build_tiny_qwen(dtype=dtype), {n: qwen_conditioning(s) for s, n in enumerate(("null", "source", "edit"))}


def _lecun_state_dict(module: torch.nn.Module, seed: int) -> dict:
    """``module``'s state dict with LeCun-initialised weights (outputs of std ~1 per layer), zero biases and unit
    RMS-norm gains (ComfyUI's layers leave them uninitialised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
            elif p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)
            else:
                p.zero_()
    return module.state_dict()


def random_taesd_decoder(folder, name: str, latent_channels: int = 16, seed: int = 0) -> Path:
    """Write ``<name>.safetensors`` (e.g. ``taesd3_decoder``, ``taef1_decoder``) into ``folder``: ComfyUI's TAESD
    ``Decoder`` with deterministic random weights (the real files are not in ../shared/weights)."""
    import_comfy()
    from comfy.taesd.taesd import Decoder
    from safetensors.torch import save_file

    sd = _lecun_state_dict(Decoder(latent_channels=latent_channels), seed)  # convolutions' outputs of std ~0.2
    path = Path(folder) / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def random_sd3_vae(seed: int = 0, std: float = 0.02):
    """A ComfyUI VAE with the SD3 / Flux autoencoder architecture (16 latent channels, no quant convs), random
    weights; ``comfy.sd.VAE`` detects it from the state dict as it detects the real file."""
    import_comfy()
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    regularizer = {"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"}
    model = AutoencodingEngine(regularizer_config=regularizer,
                               encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder",
                                               "params": ddconfig},
                               decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder",
                                               "params": ddconfig})
    init_random(model, seed, std)
    with torch.inference_mode():
        return comfy.sd.VAE(sd=model.state_dict())


def random_wan21_vae(seed: int = 0):
    """A ComfyUI VAE with the Wan 2.1 architecture Qwen-Image decodes with (``comfy.ldm.wan.vae.WanVAE``, 16 latent
    channels, 5-D latents), random weights, detected by ``comfy.sd.VAE`` from the state dict as the real file is.
    Width 8 where the host reads the width from the file (0.33); 96, the real one, where it fixes it (0.3.64)."""
    import_comfy()
    import comfy.sd
    from comfy.ldm.wan.vae import WanVAE

    for dim in (8, 96):
        with torch.inference_mode(False):
            model = WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True], dropout=0.0)
            sd = _lecun_state_dict(model, seed)
        try:
            with torch.inference_mode():
                return comfy.sd.VAE(sd=sd)
        except RuntimeError:  # size mismatch: this ComfyUI builds the real width whatever the file holds
            continue
    raise RuntimeError("this ComfyUI builds no Wan 2.1 VAE of width 8 or 96")


def random_taehv_vae(seed: int = 0):
    """lighttaew2_1 as ComfyUI's Load VAE loads it (ComfyUI 0.33: ``comfy.taesd.taehv.TAEHV``, a fast decoder of
    Wan 2.1 / Qwen-Image latents whose output is already in [0, 1]), random weights in fp32 (how ComfyUI tells it from
    taehv); None where the host has no TAEHV (0.3.64)."""
    import_comfy()
    try:
        from comfy.taesd.taehv import TAEHV
    except ImportError:
        return None
    import comfy.sd

    with torch.inference_mode(False):
        sd = _lecun_state_dict(TAEHV(latent_channels=16, latent_format=None), seed)
    with torch.inference_mode():
        return comfy.sd.VAE(sd={k: v.float() for k, v in sd.items()})


UNSUPPORTED = ("auraflow", "wan21_t2v", "stable_cascade_c", "flux_schnell")


def build_tiny_unsupported(kind: str):
    """A ModelPatcher around a tiny model of a family PSEdit does not handle (AuraFlow, the Wan 2.1 text-to-video
    model, Stable Cascade stage C, Flux schnell), from ComfyUI's own config and model classes, built under inference
    mode. Weights are left as ComfyUI's layers leave them: these models are only refused, never run."""
    with torch.inference_mode():
        import_comfy()
        import comfy.model_patcher
        import comfy.supported_models as sm

        if kind == "auraflow":
            config = sm.AuraFlow(dict(cond_seq_dim=2048, dim=64, n_layers=2, n_double_layers=1, n_heads=2,
                                      global_conddim=64, max_seq=256, in_channels=4, out_channels=4, patch_size=2))
        elif kind == "wan21_t2v":
            config = sm.WAN21_T2V(dict(image_model="wan2.1", model_type="t2v", dim=64, ffn_dim=128, num_heads=2,
                                       num_layers=1, in_dim=16, out_dim=16, text_dim=4096, freq_dim=256,
                                       text_len=512))
        elif kind == "stable_cascade_c":
            config = sm.Stable_Cascade_C(dict(stable_cascade_stage="c", c_cond=64, c_hidden=[64, 64], nhead=[2, 2],
                                              blocks=[[1, 1], [1, 1]], block_repeat=[[1, 1], [1, 1]]))
        elif kind == "flux_schnell":
            config = sm.FluxSchnell(_flux_config(guidance_embed=False))
        else:
            raise ValueError(f"kind must be one of {UNSUPPORTED}, got {kind!r}")
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({})
        device = torch.device("cpu")
        return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
