"""What PSEdit Attention Control (Prompt-to-Prompt) and Feature Injection (Plug-and-Play) cost: memory and time.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/control_cost.py [--steps 10] [--repeat 2] [--full 0]

1. **Extra memory of the records** at SD1.5 512 px and SDXL 1024 px, computed from the real architectures' layer
   shapes (each UNet built on the meta device: no weights, no compute) for one image, stored in fp16 (the model
   dtype of released checkpoints; the records take the model's dtype): per step the source pass keeps P2P's
   cross-attention probabilities ``[heads, N, 77]`` of every transformer layer and the queries and keys ``[N, C]`` of
   the self-attention layers it replaces (a quarter of the latent's side and below), or PnP's queries and keys of the
   decoder layers from the feature block on and that block's residual features. Records live for one step. Also the
   transient float32 maps the edit pass computes for one branch at the largest layer, and the trajectory (kept on
   the device in float32 for the sampling). The formula is checked against the bytes actually recorded on a tiny
   UNet (printed as "check").
2. **Cost per step**, measured: the PSEdit Triple Guider (one batched call of edit, null and source) with and
   without control, sampled by SamplerCustomAdvanced, on the trained toy model (16x16 latents) and on the tiny
   SD1.5-architecture UNet at a 32x32 latent, and with ``--full SIZE`` the full-size SD1.5 UNet (random weights) at
   SIZE px. Every control window spans all the steps (the worst case: a source pass at every step); "P2P, windows
   off" is the cost of the patches alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _common import device_name, table, tiny

SD15 = dict(
    model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    transformer_depth_middle=1,
    use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False, in_channels=4, out_channels=4,
    num_heads=8, num_head_channels=-1, context_dim=768, adm_in_channels=None,
)
SDXL = dict(
    model_channels=320, channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10],
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
    use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False, in_channels=4, out_channels=4,
    num_heads=-1, num_head_channels=64, context_dim=2048, adm_in_channels=2816, num_classes="sequential",
)
TOKENS = 77
FP16 = 2


# --- memory from the shapes -------------------------------------------------------------------------------------

def meta_unet(config: dict):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**config, image_size=32, use_checkpoint=False, use_temporal_attention=False,
                     use_temporal_resblock=False, dtype=torch.float16, device="meta",
                     operations=comfy.ops.disable_weight_init)


def layer_shapes(unet, latent: tuple[int, int]) -> list[dict]:
    """Every transformer layer (``block``, ``number``, tokens N, width C, heads) and every output block's ResBlock
    residual output (``features``: its output channels x N, what Feature Injection records) at a latent of
    ``latent`` = (h, w), by walking the blocks as the forward pass does."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

    h, w = latent
    out = []

    def transformers(block, name, number):
        for m in block.modules():
            if hasattr(m, "transformer_blocks"):
                for t in m.transformer_blocks:
                    out.append(dict(block=name, number=number, tokens=h * w, width=t.attn1.to_q.out_features,
                                    heads=t.attn1.heads))

    for i, block in enumerate(unet.input_blocks):
        transformers(block, "input", i)
        if any(isinstance(m, Downsample) for m in block.modules()):
            h, w = (h + 1) // 2, (w + 1) // 2
    transformers(unet.middle_block, "middle", 0)
    for i, block in enumerate(unet.output_blocks):
        res = next(m for m in block if isinstance(m, ResBlock))
        out.append(dict(block="features", number=i, tokens=h * w, width=res.out_channels, heads=0))
        transformers(block, "output", i)
        if any(isinstance(m, Upsample) for m in block.modules()):
            h, w = h * 2, w * 2
    return out


def record_bytes(layers: list[dict], latent_tokens: int, kind: str, feature_block: int, itemsize: int = FP16,
                 tokens: int = TOKENS) -> dict:
    """Bytes recorded per step and image: P2P (cross maps everywhere, q/k where self-attention is replaced) or PnP
    (q/k of the decoder layers from ``feature_block``, that block's residual features)."""
    attn = [x for x in layers if x["block"] != "features"]
    if kind == "p2p":
        cross = sum(x["heads"] * x["tokens"] * tokens for x in attn) * itemsize
        small = sum(2 * x["tokens"] * x["width"] for x in attn if x["tokens"] <= latent_tokens / 16) * itemsize
        return {"cross maps": cross, "self q/k": small, "total": cross + small}
    qk = sum(2 * x["tokens"] * x["width"] for x in attn if x["block"] == "output" and x["number"] >= feature_block)
    feat = sum(x["tokens"] * x["width"] for x in layers if x["block"] == "features" and x["number"] == feature_block)
    return {"self q/k": qk * itemsize, "features": feat * itemsize, "total": (qk + feat) * itemsize}


def memory_table(steps: int) -> list[dict]:
    rows = []
    for name, config, side, feature in (("SD1.5", SD15, 512, 4), ("SDXL", SDXL, 1024, 1)):
        unet = meta_unet(config)
        latent = (side // 8, side // 8)
        layers = layer_shapes(unet, latent)
        n = latent[0] * latent[1]
        attn = [x for x in layers if x["block"] != "features"]
        big = max(attn, key=lambda x: x["heads"] * x["tokens"])
        transient = 4 * big["heads"] * big["tokens"] * TOKENS  # float32 maps of one branch at the largest layer
        trajectory = (steps + 1) * 4 * n * 4
        for kind in ("p2p", "pnp"):
            r = record_bytes(layers, n, kind, feature)
            rows.append({"model": f"{name} {side} px", "control": {"p2p": "Attention Control (P2P)",
                                                                   "pnp": "Feature Injection (PnP)"}[kind],
                         "layers": len(attn), "detail": ", ".join(f"{k} {v / 2**20:.1f}" for k, v in r.items()
                                                                  if k != "total"),
                         "records_mib": r["total"] / 2**20, "transient_mib": transient / 2**20 if kind == "p2p" else 0,
                         "trajectory_mib": trajectory / 2**20})
    return rows


# --- measured: what the recording really holds (tiny UNet), and the time per step ----------------------------------

class World:
    """A model with an inverted random latent, conditionings and a negative-prompt null schedule."""

    def __init__(self, model, conds, latent, steps):
        import comfy_extras.nodes_custom_sampler as ncs
        from psedit_pack.nodes.inversion import DDIMInvert
        from psedit_pack.nodes.nulltext import NullTextInversion

        self.model, (self.null, self.source, self.edit) = model, conds
        with torch.inference_mode():
            self.sigmas = ncs.BasicScheduler().get_sigmas(model, "normal", steps, 1.0)[0]
            self.inverted, self.payload = DDIMInvert.execute(model, {"samples": latent}, self.sigmas, self.source,
                                                             1.0, 0).result
            self.schedule = NullTextInversion.execute(model, self.payload, self.null, self.source, 7.5,
                                                      "negative-prompt", 0, 1e-5, 0.01).result[0]

    def controlled(self, kind: str, on: bool = True):
        from psedit_pack.nodes.control import Controller
        from psedit_pack.nodes.p2p import P2P
        from psedit_pack.nodes.pnp import PnP, PnPController
        from psedit_pack.psedit_core.p2p import Alignment
        from psedit_pack.psedit_core.pnp import default_feature_block

        window = (0.0, 1.0) if on else (0.0, 0.0)
        if kind == "p2p":
            algorithm = P2P(Alignment.identity(self.edit[0][0].shape[1]), self.edit, "", cross=window,
                            self_window=window)
            controller = Controller(algorithm, self.payload, self.source, dtype=self.model.model_dtype())
        else:
            blocks = self.model.model.diffusion_model.output_blocks
            fb = default_feature_block([any(hasattr(m, "transformer_blocks") for m in b.modules()) for b in blocks])
            algorithm = PnP(window, fb, window, frozenset(range(fb, len(blocks))))
            controller = PnPController(algorithm, self.payload, self.source, dtype=self.model.model_dtype())
        return controller, controller.install(self.model)

    def sample(self, model):
        import comfy.samplers
        import comfy_extras.nodes_custom_sampler as ncs
        from psedit_pack.nodes.guidance import TripleGuiderNode

        with torch.inference_mode():
            g = TripleGuiderNode.execute(model, self.null, self.source, self.edit, 7.5, 3.0, None,
                                         self.schedule).result[0]
            return ncs.SamplerCustomAdvanced().sample(ncs.Noise_EmptyNoise(), g,
                                                      comfy.samplers.sampler_object("euler"), self.sigmas,
                                                      self.inverted)[0]["samples"]


def measured_records(world: World, kind: str) -> int:
    """The largest bytes held by the controller's records at one step of a real sampling."""
    import comfy.patcher_extension

    controller, model = world.controlled(kind)
    seen = []

    def spy(executor, *args, **kwargs):
        records = controller.run.records
        seen.append(sum(t.numel() * t.element_size() for t in records.values()))
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "benchmark_spy", spy)
    world.sample(model)
    return max(seen)


def check_formula(world: World) -> list[dict]:
    from psedit_pack.psedit_core.pnp import default_feature_block

    unet = world.model.model.diffusion_model
    feature_block = default_feature_block([any(hasattr(m, "transformer_blocks") for m in b.modules())
                                           for b in unet.output_blocks])
    latent = tuple(world.inverted["samples"].shape[-2:])
    layers = layer_shapes(unet, latent)
    itemsize = world.model.model_dtype().itemsize
    out = []
    for kind in ("p2p", "pnp"):
        want = record_bytes(layers, latent[0] * latent[1], kind, feature_block, itemsize,
                            tokens=world.edit[0][0].shape[1])["total"]
        out.append({"kind": kind, "formula": want, "recorded": measured_records(world, kind)})
    return out


def per_step(world: World, steps: int, repeat: int) -> list[dict]:
    rows = []
    base = None
    configs = [("Triple Guider, no control", None, True), ("P2P, windows off", "p2p", False),
               ("P2P replace (cross + self, every step)", "p2p", True), ("PnP (features + self, every step)", "pnp",
                                                                          True)]
    for label, kind, on in configs:
        model = world.model if kind is None else world.controlled(kind, on)[1]
        world.sample(model)  # warm-up
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            world.sample(model)
            times.append((time.perf_counter() - t) / steps)
        s = min(times)
        base = base or s
        rows.append({"guider": label, "s_step": s, "ratio": s / base, "spread": statistics.pstdev(times) / s})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="sampling steps per timed run")
    p.add_argument("--repeat", type=int, default=2, help="timed runs per row; the fastest is kept (busy machine)")
    p.add_argument("--full", type=int, default=0, help="also time the full-size SD1.5 UNet at this many px (0: no)")
    p.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH)")
    a = p.parse_args()
    if a.comfyui:
        os.environ["COMFYUI_PATH"] = a.comfyui
    tiny.load_pack()
    print(f"# control_cost: {device_name()}\n")
    print("Extra memory per image (records of one step, fp16; computed from the architectures' shapes; trajectory "
          "for 50 steps, float32):\n")
    print(table(memory_table(50), [("model", "model", "s"), ("control", "control", "s"), ("layers", "layers", "d"),
                                   ("records_mib", "records MiB / step", ".1f"), ("detail", "of which (MiB)", "s"),
                                   ("transient_mib", "+ transient fp32 maps MiB", ".1f"),
                                   ("trajectory_mib", "trajectory MiB", ".1f")]))
    g = torch.Generator().manual_seed(0)
    tiny_world = World(tiny.build_tiny("sd15"), [tiny.conditioning("sd15", s) for s in range(3)],
                       torch.randn(1, 4, 32, 32, generator=g), a.steps)
    print("\ncheck (tiny SD1.5 UNet, 32x32 latent, fp32): bytes recorded at one step vs the formula: " + ", ".join(
        f"{r['kind']} {r['recorded']} / {r['formula']}" for r in check_formula(tiny_world)))

    worlds = [("tiny SD1.5 architecture (1.6 M), 32x32 latent", tiny_world)]
    from psedit_toy import model as M

    with torch.inference_mode():
        model, clip, _ = M.load()
        captions = ("", "a red circle on a gray striped background", "a blue circle on a gray striped background")
        conds = [clip.encode_from_tokens_scheduled(clip.tokenize(t)) for t in captions]
    toy = World(model, conds, torch.randn(1, 4, 16, 16, generator=g), a.steps)
    worlds.append(("trained toy model (1.7 M), 16x16 latent", toy))
    if a.full:
        n = a.full // 8
        worlds.append((f"full-size SD1.5 UNet (random weights), {a.full} px",
                       World(tiny.build_tiny("sd15", size="full", std=0.02), [tiny.conditioning("sd15", s)
                                                                              for s in range(3)],
                             torch.randn(1, 4, n, n, generator=g), a.steps)))
    for name, world in worlds:
        print(f"\nCost per step, {name}, {a.steps} euler steps, best of {a.repeat}:\n")
        print(table(per_step(world, a.steps, a.repeat), [("guider", "guider", "s"), ("s_step", "s / step", ".3f"),
                                                          ("ratio", "x no control", ".2f")]))


if __name__ == "__main__":
    main()
