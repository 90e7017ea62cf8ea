"""Train the toy world's text-to-image model from scratch on the CPU (resumable).

    COMFYUI_PATH=/path/to/ComfyUI python -m psedit_toy.train            # about 45 min on 2 CPU cores

Data: ``--scenes`` captioned scenes from :mod:`psedit_toy.scenes` (held-out colour x shape pairs never appear),
encoded once with the real TAESD into SD1 model-space latents (16x16x4) and cached in ``--work``. Objective: the
SD1.5 eps loss, ``|| eps - eps_theta(sqrt(a_t) z0 + sqrt(1 - a_t) eps, t, c) ||^2`` with t uniform on SD1.5's
1000 discrete steps, 10% of captions dropped to "" (classifier-free guidance), UNet and text model trained
jointly, EMA of the weights kept and saved. A checkpoint is written every ``--save-every`` steps; rerunning the
command resumes from it. The result is ``psedit_toy/weights/toy_sd15.safetensors`` (fp16) and ``manifest.json``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from . import scenes as S

log = logging.getLogger("psedit_toy.train")


def _setup_comfy() -> None:
    root = os.environ.get("COMFYUI_PATH")
    if root and root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True
    args.use_pytorch_cross_attention = True  # on the CPU ComfyUI picks sub-quadratic attention: 3x slower here
    import comfy.model_management  # noqa: F401


def _render(scene: S.Scene) -> np.ndarray:
    return S.render(scene)[0]


def encode_dataset(vae, scenes: list[S.Scene], batch: int = 64) -> torch.Tensor:
    """Model-space latents (latent_format.process_in of TAESD's encoding) of every scene, [N, 4, 16, 16]."""
    import comfy.latent_formats

    fmt = comfy.latent_formats.SD15()
    out = []
    with Pool(2) as pool:
        for i in range(0, len(scenes), batch):
            imgs = np.stack(pool.map(_render, scenes[i:i + batch]))
            with torch.inference_mode():
                raw = vae.encode(torch.from_numpy(imgs).float() / 255)
            out.append(fmt.process_in(raw).clone())
            if (i // batch) % 20 == 0:
                log.info("encoded %d / %d scenes", i + len(imgs), len(scenes))
    return torch.cat(out)


def token_ids(clip, text: str) -> list[int]:
    return [t for t, _ in clip.tokenize(text)["l"][0]]


def _init(module: torch.nn.Module) -> None:
    """ComfyUI's layers start uninitialised: norms at identity, embeddings N(0, 0.02), the rest Xavier, biases 0."""
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            for name, prm in mod.named_parameters(recurse=False):
                if isinstance(mod, norms):
                    prm.fill_(1.0 if name == "weight" else 0.0)
                elif prm.ndim == 1 or prm.ndim == 0:
                    prm.zero_()
                elif "embedding" in mod_name:
                    prm.normal_(0, 0.02)
                else:
                    torch.nn.init.xavier_uniform_(prm.view(prm.shape[0], -1))


def text_forward(text, id_lists: list[list[int]]) -> torch.Tensor:
    """The text model's "last" hidden states, as ``SDClipModel.forward`` computes them, without its in-place
    residual adds (autograd refuses those). ``main`` checks that the two agree before training."""
    from comfy.ldm.modules.attention import optimized_attention_for_device

    tm = text.clip_l.transformer.text_model
    ids = torch.tensor(id_lists, dtype=torch.long)
    x = tm.embeddings.token_embedding(ids, out_dtype=torch.float32) + tm.embeddings.position_embedding.weight
    mask = torch.full((x.shape[1], x.shape[1]), -torch.finfo(x.dtype).max).triu_(1)
    attention = optimized_attention_for_device(x.device, mask=True, small_input=True)
    for layer in tm.encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x), mask, attention)
        x = x + layer.mlp(layer.layer_norm2(x))
    return tm.final_layer_norm(x)


def lr_at(step: int, steps: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.1 * peak + 0.9 * peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=8000)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--work", type=Path, default=Path("bench_out/toy_train"))
    p.add_argument("--out", type=Path, default=None, help="weights file (default: psedit_toy/weights/...)")
    p.add_argument("--taesd", type=Path, default=None, help="folder with taesd_{encoder,decoder}.safetensors")
    p.add_argument("--max-minutes", type=float, default=60.0,
                   help="wall-time budget including the data encoding: training stops at the last checkpoint "
                   "before it (the manifest records the steps reached)")
    p.add_argument("--export-only", action="store_true",
                   help="write the weights of the last checkpoint in --work without training further")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    _setup_comfy()
    from safetensors.torch import save_file

    from . import model as M

    torch.set_num_threads(os.cpu_count() or 2)
    a.work.mkdir(parents=True, exist_ok=True)
    out = a.out or M.WEIGHTS
    wall0 = time.time()

    scenes = S.training_scenes(a.scenes, a.seed)
    digest = S.dataset_digest(scenes)
    data_file = a.work / f"latents_{digest[:12]}.pt"
    if data_file.is_file():
        latents = torch.load(data_file)
    else:
        latents = encode_dataset(M.taesd_vae(a.taesd), scenes)
        torch.save(latents, data_file)
    captions = [S.caption(s) for s in scenes]
    log.info("data: %d scenes, %d captions, latents std %.3f (%.0f s)", len(scenes), len(set(captions)),
             latents.std().item(), time.time() - wall0)

    torch.manual_seed(a.seed)
    patcher, clip = M.build_model(), M.build_clip()
    unet, text = patcher.model.diffusion_model, clip.cond_stage_model
    for module in (unet, text):
        _init(module)
        module.train().requires_grad_(True)
    with torch.no_grad():  # residual branches start at zero (the usual diffusion UNet init)
        for name, prm in unet.named_parameters():
            if name.endswith("out_layers.3.weight") or name.endswith("proj_out.weight") or name == "out.2.weight":
                prm.zero_()
    text.clip_l.logit_scale.requires_grad_(False)
    params = [q for q in list(unet.parameters()) + list(text.parameters()) if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)

    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    live_params = list(unet.parameters()) + list(text.parameters())
    ckpt = a.work / "checkpoint.pt"
    step, losses, train_seconds = 0, [], 0.0
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(st["unet"])
        text.load_state_dict(st["text"])
        ema_unet.load_state_dict(st["ema_unet"])
        ema_text.load_state_dict(st["ema_text"])
        opt.load_state_dict(st["opt"])
        step, losses, train_seconds = st["step"], st["losses"], st["seconds"]
        torch.set_rng_state(st["rng"])
        log.info("resumed at step %d", step)
    if a.export_only:
        a.steps = step

    ids = {c: token_ids(clip, c) for c in sorted(set(captions)) + [""]}
    with torch.no_grad():
        probe = [ids[captions[0]], ids[""]]
        err = (text_forward(text, probe) - text.clip_l(probe)[0]).abs().max().item()
    if err > 1e-4:
        raise RuntimeError(f"training text forward differs from ComfyUI's by {err:.2e}")
    sigmas = patcher.model.model_sampling.sigmas.float()  # SD1.5's 1000 discrete sigmas
    try:
        from tqdm import tqdm

        bar = tqdm(total=a.steps, initial=step, desc="toy training", dynamic_ncols=True)
    except ImportError:
        bar = None
    n = len(scenes)
    t_last = time.time()
    budget_end, start_step, loop_start = wall0 + 60 * a.max_minutes, step, time.time()
    stopped_early = False
    while step < a.steps:
        per_step = (time.time() - loop_start) / max(step - start_step, 1)
        if step > start_step and step % a.save_every == 0 and time.time() + per_step * a.save_every > budget_end:
            stopped_early = True  # the next checkpoint would land past the budget
            log.warning("stopping at step %d of %d: the %.0f-minute budget would run out before the next "
                        "checkpoint", step, a.steps, a.max_minutes)
            break
        idx = torch.randint(0, n, (a.batch,))
        z0 = latents[idx]
        caps = [captions[i] if torch.rand(()) > 0.1 else "" for i in idx.tolist()]
        t = torch.randint(0, 1000, (a.batch,))
        sigma = sigmas[t]
        eps = torch.randn_like(z0)
        x_in = (z0 + sigma[:, None, None, None] * eps) / torch.sqrt(1 + sigma**2)[:, None, None, None]
        ctx = text_forward(text, [ids[c] for c in caps])
        pred = unet(x_in, t.float(), context=ctx)
        loss = torch.nn.functional.mse_loss(pred, eps)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.steps, a.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, live_params, 1 - decay)
        losses.append(loss.item())
        step += 1
        now = time.time()
        train_seconds += now - t_last
        t_last = now
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if step % a.save_every == 0 or step == a.steps:
            torch.save({"unet": unet.state_dict(), "text": text.state_dict(), "ema_unet": ema_unet.state_dict(),
                        "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "step": step, "losses": losses,
                        "seconds": train_seconds, "rng": torch.get_rng_state()}, ckpt.with_suffix(".tmp"))
            os.replace(ckpt.with_suffix(".tmp"), ckpt)
            if bar is None:
                log.info("step %d loss %.4f", step, np.mean(losses[-100:]))
    if bar is not None:
        bar.close()

    sd = {f"model.diffusion_model.{k}": v.half().contiguous() for k, v in ema_unet.state_dict().items()}
    sd.update({f"cond_stage_model.{k}": v.half().contiguous() for k, v in ema_text.state_dict().items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata={"format": "pt", "psedit_toy": S.DATA_VERSION})
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    manifest = {
        "file": out.name, "sha256": sha, "bytes": out.stat().st_size, "dtype": "float16 (EMA 0.999 weights)",
        "data_version": S.DATA_VERSION, "data_sha256": digest, "scenes": a.scenes, "seed": a.seed,
        "held_out_pairs": sorted(map(list, S.HELD_OUT_PAIRS)), "steps": a.steps, "batch": a.batch, "lr": a.lr,
        "final_loss_mean_last_100": float(np.mean(losses[-100:])), "loss_curve_every_250": [
            float(np.mean(losses[max(0, i - 100):i])) for i in range(250, len(losses) + 1, 250)],
        "train_seconds": round(train_seconds, 1), "cpu_threads": torch.get_num_threads(),
        "steps_reached": step, "stopped_by_budget": stopped_early,
        "unet_config": M.UNET_CONFIG, "text_config": M.TEXT_CONFIG, "taesd": "madebyollin/taesd SD1 (real)",
        "command": "python -m psedit_toy.train " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (out.parent / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %s (%.1f MB, sha256 %s), final loss %.4f, %.0f s training", out, out.stat().st_size / 1e6,
             sha[:12], manifest["final_loss_mean_last_100"], train_seconds)


if __name__ == "__main__":
    main()
