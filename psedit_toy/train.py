"""Train the toy world's text-to-image model from scratch (resumable; CPU, or CUDA when torch sees one).

    COMFYUI_PATH=/path/to/ComfyUI python -m psedit_toy.train --threads 1 --max-minutes 300   # about 4.5 h here
    COMFYUI_PATH=/path/to/ComfyUI python -m psedit_toy.train --family flow --steps 18000 --threads 1 --max-minutes 600

Data: ``--scenes`` captioned scenes of world ``--world`` from :mod:`psedit_toy.scenes` (held-out colour x shape
pairs never appear), encoded once with the real TAESD into SD1 model-space latents (16x16x4) and cached in
``--work``. Model: ``--arch`` of :data:`psedit_toy.model.ARCHS`. Objective: the SD1.5 eps loss,
``w(t) || eps - eps_theta(sqrt(a_t) z0 + sqrt(1 - a_t) eps, t, c) ||^2`` with t uniform on SD1.5's 1000 discrete
steps, w(t) = min(1, gamma / SNR(t)) (min-SNR weighting, ``--min-snr``: the nearly clean steps stop dominating the
gradient), eps with a per-channel offset (``--offset-noise``: SD1.5's last step leaves 7% of the latent, so without
it a model reads the background's brightness from the noise's mean, which at sampling is random), 10% of captions
dropped to "" (classifier-free guidance), UNet and text model trained jointly, EMA of the weights kept and saved.

``--family flow`` trains the flow-matching twin (:mod:`psedit_toy.flow_model`, ``--arch`` of its ``ARCHS``) on the
same scenes and latents, with SD3's rectified-flow objective: ``x = (1 - sigma) z0 + sigma eps``, loss
``|| (eps - z0) - v_theta(x, 1000 sigma, c, pooled) ||^2`` unweighted (SD3's "rf/lognorm": the timestep density does
the weighting; min-SNR and offset noise do not apply, sigma = 1 being pure noise), ``sigma = shift(u)`` with
``u = sigmoid(n)``, ``n ~ N(--logit-mean, --logit-std^2)`` (SD3's 0, 1) and ``shift(u) = s u / (1 + (s - 1) u)`` the
model's own sampling shift (s = 3): the training density is the logit-normal carried through the same shift
ComfyUI's schedulers sample with (as SD3's trainers index the shifted schedule). The text model is trained through
both the token sequence and the pooled vector. Peak learning rate 3e-4 (the eps model's 6e-4 is for its UNet). The
checkpoint records the family: an eps checkpoint never resumes as a flow run. The weights go to
``psedit_toy/weights/toy_sd3.safetensors`` with their manifest ``toy_sd3.json`` (``"family": "flow"``) beside them.
``--teacher`` (with ``--family flow``) regresses the twin on the trained eps model's velocity instead of the single
draw's ``eps - z0`` up to ``--teacher-max-sigma`` (:class:`Teacher`): knowledge distillation, which removes the
target's own variance where the twin lags the eps model (below sigma 0.4 it loses the shapes it laid out).
``--on-policy F`` (with ``--teacher``) takes a fraction F of each batch from the states the twin itself reaches
when it samples (:class:`OnPolicy`), the teacher's velocity their target: the twin's failures are on its own mid-way
latents, which noised training latents need not cover. ``--init FILE`` starts a run without a checkpoint from an
exported weights file (networks and EMA; a fresh optimiser and schedule), recorded as ``init_from`` in the manifest.

A checkpoint is written every ``--save-every`` steps and on SIGINT/SIGTERM; rerunning the same command resumes from
it (with a different ``--steps`` it trains on to the new count). The result is the EMA weights in fp16
(default ``psedit_toy/weights/toy_sd15.safetensors``) and ``manifest.json`` beside them, which ``model.load`` reads
the architecture from. Defaults train the v2 model; the first model was ``--world toy-scenes-v1 --arch v1
--scenes 8000 --steps 5000 --min-snr 0 --offset-noise 0``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from . import scenes as S

log = logging.getLogger("psedit_toy.train")

# checkpoint settings that must match to resume: they fix the data and the network
# (checkpoints written before the flow twin have no "family": they are eps)
FIXED = ("family", "world", "arch", "scenes", "seed", "batch")
EPS_DEFAULTS = {"arch": "v2", "lr": 6e-4, "min_snr": 5.0, "offset_noise": 0.1}
FLOW_DEFAULTS = {"lr": 3e-4, "logit_mean": 0.0, "logit_std": 1.0, "teacher_max_sigma": 0.6}
FLOW_ONLY = ("teacher", "on_policy")  # flow options without a default (None: off), refused with --family eps
UNET_KEYS, TEXT_KEYS = "model.diffusion_model.", "cond_stage_model."  # the weights file's key prefixes


def caption_or_empty(caption: str) -> str:
    """The caption, or "" one time in ten (caption dropout, for classifier-free guidance); one CPU draw."""
    return caption if torch.rand(()) > 0.1 else ""


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


def encode_dataset(vae, scenes: list[S.Scene], batch: int = 64, workers: int = 1) -> torch.Tensor:
    """Model-space latents (latent_format.process_in of TAESD's encoding) of every scene, [N, 4, 16, 16], on the CPU.

    ``workers`` > 1 renders in that many processes."""
    import comfy.latent_formats

    fmt = comfy.latent_formats.SD15()
    out = []
    pool = Pool(workers) if workers > 1 else None
    try:
        for i in range(0, len(scenes), batch):
            chunk = scenes[i:i + batch]
            imgs = np.stack(pool.map(_render, chunk) if pool else [_render(s) for s in chunk])
            with torch.inference_mode():
                raw = vae.encode(torch.from_numpy(imgs).float() / 255)
            out.append(fmt.process_in(raw).float().cpu().clone())
            if (i // batch) % 20 == 0:
                log.info("encoded %d / %d scenes", i + len(imgs), len(scenes))
    finally:
        if pool:
            pool.close()
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
    device = tm.embeddings.position_embedding.weight.device
    ids = torch.tensor(id_lists, dtype=torch.long, device=device)
    x = tm.embeddings.token_embedding(ids, out_dtype=torch.float32) + tm.embeddings.position_embedding.weight
    mask = torch.full((x.shape[1], x.shape[1]), -torch.finfo(x.dtype).max, device=device).triu_(1)
    attention = optimized_attention_for_device(x.device, mask=True, small_input=True)
    for layer in tm.encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x), mask, attention)
        x = x + layer.mlp(layer.layer_norm2(x))
    return tm.final_layer_norm(x)


def lr_at(step: int, steps: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.1 * peak + 0.9 * peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def loss_weights(sigma: torch.Tensor, gamma: float) -> torch.Tensor:
    """min-SNR-gamma weights of the eps loss, min(1, gamma / SNR) with SNR = 1 / sigma^2; ones when gamma is 0."""
    if gamma <= 0:
        return torch.ones_like(sigma)
    return torch.clamp(gamma * sigma**2, max=1.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from . import flow_model as F
    from . import model as M

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="eps", choices=("eps", "flow"),
                   help="eps: the SD1.5-family UNet; flow: the SD3-family MMDiT twin (rectified flow)")
    p.add_argument("--world", default=S.LATEST, choices=sorted(S.WORLDS), help="scene version (object sizes)")
    p.add_argument("--arch", default=None, choices=sorted({*M.ARCHS, *F.ARCHS}),
                   help=f"eps: a UNet configuration ({', '.join(sorted(M.ARCHS))}; default {EPS_DEFAULTS['arch']}); "
                   f"flow: an MMDiT configuration ({', '.join(sorted(F.ARCHS))}; default {F.DEFAULT_ARCH})")
    p.add_argument("--scenes", type=int, default=10000)
    p.add_argument("--steps", type=int, default=9000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default eps {EPS_DEFAULTS['lr']:g}, flow {FLOW_DEFAULTS['lr']:g})")
    p.add_argument("--min-snr", type=float, default=None,
                   help=f"eps: min-SNR gamma of the loss weights (0: unweighted; default {EPS_DEFAULTS['min_snr']:g})")
    p.add_argument("--offset-noise", type=float, default=None,
                   help=f"eps: std of the per-channel noise offset (0: none; default {EPS_DEFAULTS['offset_noise']:g})")
    p.add_argument("--logit-mean", type=float, default=None,
                   help=f"flow: mean of the logit-normal timestep density (default {FLOW_DEFAULTS['logit_mean']:g})")
    p.add_argument("--logit-std", type=float, default=None,
                   help=f"flow: its std (default {FLOW_DEFAULTS['logit_std']:g})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads (torch and rendering)")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=250, help="a loss line in the log every this many steps")
    p.add_argument("--work", type=Path, default=Path("bench_out/toy_train"), help="latent cache and checkpoint")
    p.add_argument("--out", type=Path, default=None, help="weights file (default: psedit_toy/weights/...)")
    p.add_argument("--taesd", type=Path, default=None, help="folder with taesd_{encoder,decoder}.safetensors")
    p.add_argument("--max-minutes", type=float, default=60.0,
                   help="wall-time budget of this run including the data encoding: training stops at the last "
                   "checkpoint before it and writes the weights (the manifest records the steps reached); rerun to "
                   "go on")
    p.add_argument("--teacher", default=None,
                   help="flow: an eps model's weights (e.g. psedit_toy/weights/toy_sd15.safetensors) whose velocity "
                   "the twin regresses on instead of the noisy target eps - z0 (distillation; see Teacher)")
    p.add_argument("--teacher-max-sigma", type=float, default=None,
                   help=f"flow: the teacher's velocity is the target up to this sigma (default "
                   f"{FLOW_DEFAULTS['teacher_max_sigma']:g}; see Teacher)")
    p.add_argument("--on-policy", type=float, default=None,
                   help="flow, with --teacher: this fraction of each batch is drawn from states the twin reaches when "
                   "it samples, with the teacher's velocity as their target (see OnPolicy)")
    p.add_argument("--init", type=Path, default=None,
                   help="weights file (an export of this script) the networks and their EMA start from when --work "
                   "has no checkpoint: fine-tuning with a fresh optimiser and learning-rate schedule")
    p.add_argument("--shape-weight", action="append", default=[], metavar="SHAPE=W",
                   help="draw scenes holding a SHAPE object W times as often (repeatable, e.g. star=3; the on-policy "
                   "captions too); default: every scene alike (see scene_weights)")
    p.add_argument("--export-only", action="store_true",
                   help="write the weights of the last checkpoint in --work (with its settings) without training")
    return resolve_family(p, p.parse_args(argv))


def resolve_family(p: argparse.ArgumentParser, a: argparse.Namespace) -> argparse.Namespace:
    """Fill the family's defaults (``EPS_DEFAULTS`` / ``FLOW_DEFAULTS``); refuse the other family's options."""
    from . import flow_model as F
    from . import model as M

    own, other, archs = ((EPS_DEFAULTS, FLOW_DEFAULTS, M.ARCHS) if a.family == "eps" else
                         ({**FLOW_DEFAULTS, "arch": F.DEFAULT_ARCH}, EPS_DEFAULTS, F.ARCHS))
    foreign = [k for k in other if k not in own and getattr(a, k) is not None]
    if a.family == "eps":
        foreign += [k for k in FLOW_ONLY if getattr(a, k) is not None]
    if foreign:
        p.error(f"--{foreign[0].replace('_', '-')} is not an option of --family {a.family}")
    for k, v in own.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.family == "flow" and a.on_policy is not None and not (0 < a.on_policy <= 1 and a.teacher):
        p.error("--on-policy takes a fraction in (0, 1] and needs --teacher (the on-policy states' target)")
    try:
        a.shape_weight = parse_shape_weights(a.shape_weight)
    except ValueError as e:
        p.error(str(e))
    if a.arch not in archs:
        p.error(f"--arch {a.arch} is not a {a.family} configuration: choose one of {', '.join(sorted(archs))}")
    return a


def parse_shape_weights(specs: list[str]) -> dict[str, float]:
    """``["star=3"]`` -> ``{"star": 3.0}``; ValueError naming the option where a SHAPE or W is not one."""
    out = {}
    for spec in specs:
        shape, _, w = spec.partition("=")
        try:
            weight = float(w)
        except ValueError:
            weight = math.nan
        if shape not in S.SHAPES or not 0 < weight < math.inf:
            raise ValueError(f"--shape-weight {spec!r}: write SHAPE=W with SHAPE one of {', '.join(S.SHAPES)} and W "
                             "a positive number")
        out[shape] = weight
    return out


def scene_weights(scenes: list[S.Scene], shape_weight: dict[str, float]) -> torch.Tensor | None:
    """Sampling weight of each training scene: the largest ``shape_weight`` among its objects' shapes (1 for a shape
    not named); None when no shape is weighted (uniform draws, as every run before ``--shape-weight``). Hard-example
    weighting: the flow twin draws circles, squares and triangles it is asked for but rounds most stars into circles
    (README, toy world), so its last stage sees stars more often."""
    if not shape_weight:
        return None
    return torch.tensor([max(shape_weight.get(o.shape, 1.0) for o in sc.objects) for sc in scenes],
                        dtype=torch.float64)


def draw_indices(n: int, k: int, weights: torch.Tensor | None) -> torch.Tensor:
    """``k`` indices into ``n`` items: uniform (``randint``) or, with ``weights``, in proportion to them (with
    replacement). Both on the CPU generator, so a resumed run draws what an uninterrupted one would."""
    if weights is None:
        return torch.randint(0, n, (k,))
    return torch.multinomial(weights, k, replacement=True)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(device)})"
    return f"CPU, {torch.get_num_threads()} thread(s)"


def load_data(a: argparse.Namespace, M) -> tuple[list[S.Scene], torch.Tensor, str]:
    """The scenes, their cached (or freshly encoded) latents [N, 4, 16, 16] and the data digest."""
    t0 = time.time()
    scenes = S.training_scenes(a.scenes, a.seed, a.world)
    digest = S.dataset_digest(scenes, a.world)
    data_file = a.work / f"latents_{digest[:12]}.pt"
    if data_file.is_file():
        latents = torch.load(data_file)
    else:
        latents = encode_dataset(M.taesd_vae(a.taesd), scenes, workers=a.threads)
        torch.save(latents, data_file)
    log.info("data: %s, %d scenes, %d captions, latents std %.3f (%.0f s)", a.world, len(scenes),
             len({S.caption(s) for s in scenes}), latents.std().item(), time.time() - t0)
    return scenes, latents, digest


def build_eps(a: argparse.Namespace, M):
    """The SD1.5-family UNet and the text model, initialised for training (residual branches at zero)."""
    patcher, clip = M.build_model(unet_config=M.ARCHS[a.arch]), M.build_clip()
    unet, text = patcher.model.diffusion_model, clip.cond_stage_model
    for module in (unet, text):
        _init(module)
        module.train().requires_grad_(True)
    with torch.no_grad():  # residual branches start at zero (the usual diffusion UNet init)
        for name, prm in unet.named_parameters():
            if name.endswith(("out_layers.3.weight", "proj_out.weight")) or name == "out.2.weight":
                prm.zero_()
    return patcher, clip


def build_flow(a: argparse.Namespace, M):
    """The SD3-family MMDiT (adaLN-Zero, :func:`psedit_toy.flow_model.init_weights`) and the text model."""
    from . import flow_model as F

    patcher, clip = F.build_model(mmdit=F.ARCHS[a.arch]), M.build_clip()
    F.init_weights(patcher.model.diffusion_model)
    _init(clip.cond_stage_model)
    for module in (patcher.model.diffusion_model, clip.cond_stage_model):
        module.train().requires_grad_(True)
    return patcher, clip


def checkpoint_config(ckpt: Path) -> dict:
    """The settings a checkpoint was trained with ({} without one); "family" is eps where it predates the flow twin."""
    if not ckpt.is_file():
        return {}
    return {"family": "eps", **torch.load(ckpt, weights_only=False, map_location="cpu", mmap=True).get("config", {})}


class Trainer:
    """The networks (``unet`` is the denoiser: the UNet, or the flow twin's MMDiT), their EMA, the optimiser and the
    training state; checkpoints to ``work/checkpoint.pt``."""

    def __init__(self, a: argparse.Namespace, M, device: torch.device):
        self.a, self.device = a, device
        torch.manual_seed(a.seed)
        self.patcher, self.clip = (build_flow if a.family == "flow" else build_eps)(a, M)
        self.unet, self.text = self.patcher.model.diffusion_model, self.clip.cond_stage_model
        self.text.clip_l.logit_scale.requires_grad_(False)
        self.params = [q for q in list(self.unet.parameters()) + list(self.text.parameters()) if q.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=a.lr, weight_decay=0.0)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_text = copy.deepcopy(self.text).requires_grad_(False)
        self.step, self.losses, self.seconds = 0, [], 0.0
        self.ckpt = a.work / "checkpoint.pt"
        self.trained_on = ""  # describe_device() of the runs that trained it

    def config(self) -> dict:
        a = self.a
        common = {"family": a.family, "world": a.world, "arch": a.arch, "scenes": a.scenes, "seed": a.seed,
                  "batch": a.batch, "steps": a.steps, "lr": a.lr, "shape_weight": a.shape_weight}
        if a.family == "flow":
            return {**common, "logit_mean": a.logit_mean, "logit_std": a.logit_std, "teacher": a.teacher,
                    "teacher_max_sigma": a.teacher_max_sigma, "on_policy": a.on_policy,
                    "init": str(a.init) if a.init else None}
        return {**common, "min_snr": a.min_snr, "offset_noise": a.offset_noise}

    def initialise(self, path: Path) -> None:
        """``--init``: the networks and their EMA from an exported weights file (:func:`export`'s keys)."""
        from safetensors.torch import load_file

        sd = load_file(str(path))
        for prefix, live, ema in ((UNET_KEYS, self.unet, self.ema_unet), (TEXT_KEYS, self.text, self.ema_text)):
            part = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
            live.load_state_dict(part)
            ema.load_state_dict(part)
        log.info("networks and EMA initialised from %s", path)

    def resume(self) -> None:
        """Load the checkpoint if there is one; its data and network settings must equal this run's. Without one,
        start from ``--init``'s weights where given."""
        if not self.ckpt.is_file():
            if getattr(self.a, "init", None):
                self.initialise(self.a.init)
            return
        st = torch.load(self.ckpt, weights_only=False, map_location="cpu")
        saved = {"family": "eps", **st.get("config", {})}
        wrong = {k: (saved.get(k), getattr(self.a, k)) for k in FIXED if k in saved and saved[k] != getattr(self.a, k)}
        if wrong:
            raise SystemExit(f"{self.ckpt} was trained with other settings (checkpoint, now): {wrong}; use another "
                             "--work or the same settings")
        changed = {k: v for k, v in saved.items() if k not in FIXED and v != self.config()[k]}
        if changed:
            log.warning("resuming with changed settings (checkpoint had %s)", changed)
        for name in ("unet", "text", "ema_unet", "ema_text", "opt"):
            getattr(self, name).load_state_dict(st[name])
        self.step, self.losses, self.seconds = st["step"], st["losses"], st["seconds"]
        self.trained_on = st.get("trained_on", "")
        torch.set_rng_state(st["rng"])
        log.info("resumed at step %d of %d from %s", self.step, self.a.steps, self.ckpt)

    def to(self, device: torch.device) -> None:
        for module in (self.unet, self.text, self.ema_unet, self.ema_text):
            module.to(device)
        for state in self.opt.state.values():
            for k, v in state.items():
                if torch.is_tensor(v) and k != "step":
                    state[k] = v.to(device)

    def save(self) -> None:
        st = {name: getattr(self, name).state_dict() for name in ("unet", "text", "ema_unet", "ema_text", "opt")}
        st.update(step=self.step, losses=self.losses, seconds=self.seconds, rng=torch.get_rng_state(),
                  config=self.config(), trained_on=self.trained_on)
        torch.save(st, self.ckpt.with_suffix(".tmp"))
        os.replace(self.ckpt.with_suffix(".tmp"), self.ckpt)


class _Stop:
    """Set by SIGINT / SIGTERM: the loop checkpoints and exits at the end of the current step."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, signum, frame):  # noqa: ARG002 (signal handler signature)
        self.signal = signum


def _progress(a: argparse.Namespace, initial: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    interval = 0.1 if sys.stderr.isatty() else 30.0  # a log file gets a bar line every 30 s, not every step
    return tqdm(total=a.steps, initial=initial, desc="toy training", dynamic_ncols=True, mininterval=interval)


def eps_objective(sigmas: torch.Tensor):
    """``objective(tr, z0, id_lists) -> (loss, per-sample MSE)`` of the eps model: min-SNR-weighted eps MSE at t
    uniform on SD1.5's 1000 discrete ``sigmas`` (module docstring). Its draws (t, eps, offset) come from the CPU
    generator after the batch's, in the order the first models drew them."""

    def objective(tr: Trainer, z0: torch.Tensor, id_lists: list[list[int]]):
        a, dev = tr.a, tr.device
        t = torch.randint(0, 1000, (a.batch,))
        eps = torch.randn(a.batch, *z0.shape[1:])
        if a.offset_noise:
            eps = eps + a.offset_noise * torch.randn(a.batch, z0.shape[1], 1, 1)
        sigma, eps = sigmas[t].to(dev), eps.to(dev)
        x_in = (z0 + sigma[:, None, None, None] * eps) / torch.sqrt(1 + sigma**2)[:, None, None, None]
        pred = tr.unet(x_in, t.float().to(dev), context=text_forward(tr.text, id_lists))
        mse = (pred.float() - eps).square().mean(dim=(1, 2, 3))
        return (loss_weights(sigma, a.min_snr) * mse).mean(), mse

    return objective


def flow_sigmas(n: torch.Tensor, sampling, mean: float, std: float) -> torch.Tensor:
    """``sigma = shift(sigmoid(mean + std n))``: logit-normal times carried through the model's own shift
    (``ModelSamplingDiscreteFlow.sigma``, ``shift(u) = s u / (1 + (s - 1) u)``), as its schedulers place steps."""
    return sampling.sigma(torch.sigmoid(mean + std * n) * sampling.multiplier)


def text_and_pooled(text, id_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The token sequence (:func:`text_forward`) and the pooled vector ``SDClipModel`` returns beside it with
    ``return_projected_pooled=False``: the hidden state at the first end-of-text token."""
    from . import flow_model as F

    hidden = text_forward(text, id_lists)
    at = torch.tensor([F.pooled_index(ids) for ids in id_lists], device=hidden.device)
    return hidden, hidden[torch.arange(len(id_lists), device=hidden.device), at]


class Teacher:
    """The trained eps model as the flow twin's teacher (``--teacher``): its velocity at a flow point.

    A flow point ``x = (1 - s) z0 + s eps`` is the eps model's ``x_k = z0 + k eps`` scaled by ``1 - s``, with
    ``k = s / (1 - s)``; the eps model's prediction ``eps_hat`` at ``(x / (1 - s), k)`` gives
    ``z0_hat = (x - s eps_hat) / (1 - s)`` and the velocity

        v_teacher = eps_hat - z0_hat = (eps_hat - x) / (1 - s)                                              (T1)

    the posterior mean of the flow target ``eps - z0`` as far as the teacher knows it. Regressing on it instead of
    on the single draw ``eps - z0`` removes the target's own variance (most of the flow loss: it stays near 0.26
    however long the twin trains), which is what slows the twin's learning of shapes. ``k`` must lie in the eps
    model's range [sigma_min, sigma_max] (SD1.5's 0.029 - 14.6; ``s`` up to 0.936), and ``s`` at most ``max_sigma``:
    T1 divides the teacher's eps error by ``1 - s``, so at high noise its velocity is worse than the twin's own
    (measured on the step-12250 twin, MSE to the draws' targets, 64 scenes: teacher 0.542 / 0.266 / 0.223 / 0.266 /
    0.355 / 0.467 against the twin's 0.641 / 0.376 / 0.280 / 0.254 / 0.270 / 0.284 at s = 0.1 / 0.3 / 0.5 / 0.75 /
    0.85 / 0.9); elsewhere the target is the draw's own ``eps - z0``."""

    def __init__(self, path: Path, device: torch.device, max_sigma: float):
        from . import model as M

        info = M.manifest(path)
        if info.get("family", "eps") != "eps":
            raise SystemExit(f"--teacher {path}: not an eps model (its manifest says family {info['family']})")
        patcher, clip, _ = M.load(path)
        self.unet = patcher.model.diffusion_model.to(device).eval().requires_grad_(False)
        self.text = clip.cond_stage_model.to(device).eval().requires_grad_(False)
        self.sampling = patcher.model.model_sampling
        self.sha256 = info.get("sha256", "")
        self.path, self.max_sigma = path, max_sigma

    def covers(self, s: torch.Tensor) -> torch.Tensor:
        """Where the teacher's velocity is the target: its sigma range holds ``k(s)`` and ``s <= max_sigma``."""
        k = eps_sigma(s)
        lo, hi = float(self.sampling.sigma_min), float(self.sampling.sigma_max)
        return (k >= lo) & (k <= hi) & (s <= self.max_sigma)

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, s: torch.Tensor, id_lists: list[list[int]], draw_target: torch.Tensor):
        """(T1) where the eps model's sigma range covers ``s`` and ``s <= max_sigma``, ``draw_target`` elsewhere;
        and that mask."""
        covered = self.covers(s)
        s_in = torch.where(covered, s, torch.full_like(s, 0.5))  # (uncovered rows are replaced below)
        eps_hat = self.unet(eps_input(x, s_in), self.sampling.timestep(eps_sigma(s_in)),
                            context=text_forward(self.text, id_lists))
        v = velocity_from_eps(eps_hat.float(), x, s_in)
        return torch.where(covered[:, None, None, None], v, draw_target).clone(), covered


def eps_sigma(s: torch.Tensor) -> torch.Tensor:
    """The eps model's sigma ``k = s / (1 - s)`` of the flow point at ``s`` (s < 1)."""
    return s / (1 - s)


def eps_input(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The eps UNet's input for the flow point ``x`` at ``s``: ``x_k / sqrt(1 + k^2)`` with ``x_k = x / (1 - s)``,
    i.e. ``x / sqrt((1 - s)^2 + s^2)`` (ComfyUI's ``EPS.calculate_input``)."""
    return x / torch.sqrt((1 - s) ** 2 + s**2)[:, None, None, None]


def velocity_from_eps(eps_hat: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(T1): ``v = (eps_hat - x) / (1 - s)``, which is ``eps - z0`` exactly when ``eps_hat`` is the draw's eps."""
    return (eps_hat - x) / (1 - s)[:, None, None, None]


class OnPolicy:
    """States the twin itself reaches when it samples, as training inputs (``--on-policy``; DAgger-style
    distillation). Sampling from noise with CFG, the twin lays out an object's shape at high noise and loses it below
    sigma 0.4 (``benchmarks/toy_flow_hybrid.py``: the eps model's velocity below 0.4 on the twin's own trajectory keeps
    it), so its errors are on its own mid-way latents, which the data's ``(1 - s) z0 + s eps`` need not cover.
    Every ``every`` training steps the live twin samples ``n`` training captions (euler, CFG ``cfg``, the ``normal``
    schedule of ``steps`` steps) and keeps each trajectory's states the teacher covers (``Teacher.covers``: s from
    0.028 to ``max_sigma``); each batch then
    takes ``fraction`` of its rows from them, with the teacher's velocity (T1) for their caption as the target."""

    def __init__(self, sampling, teacher: Teacher, fraction: float, captions: list[str], ids: dict,
                 shape: tuple[int, ...], n: int = 32, steps: int = 20, every: int = 20, cfg: float = 7.5,
                 weights: torch.Tensor | None = None):
        import comfy.samplers

        self.sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", steps).float()
        self.teacher, self.fraction, self.captions, self.ids = teacher, fraction, captions, ids
        self.n, self.every, self.cfg, self.sampling, self.shape = n, every, cfg, sampling, tuple(shape)
        self.weights = weights  # the captions' sampling weights (scene_weights), None: uniform
        self.x, self.s, self.rows, self.since = None, None, [], 0

    def rows_of(self, batch: int) -> int:
        return round(self.fraction * batch)

    @torch.no_grad()
    def rollout(self, tr: Trainer) -> None:
        """Sample ``n`` captions with the live twin and keep the states the teacher covers."""
        dev = tr.device
        caps = [self.captions[i] for i in draw_indices(len(self.captions), self.n, self.weights).tolist()]
        cond = text_and_pooled(tr.text, [self.ids[c] for c in caps] + [self.ids[""]] * self.n)
        x = torch.randn(self.n, *self.shape).to(dev) * float(self.sigmas[0])
        xs, ss = [], []
        for s, s_next in zip(self.sigmas[:-1].tolist(), self.sigmas[1:].tolist(), strict=True):
            if self.teacher.covers(torch.tensor(s)):
                xs.append(x.clone())
                ss.append(torch.full((self.n,), s))
            t = self.sampling.timestep(torch.full((2 * self.n,), s)).to(dev)
            vc, vu = tr.unet(torch.cat([x, x]), t, context=cond[0], y=cond[1]).float().chunk(2)
            x = x + (s_next - s) * (vu + self.cfg * (vc - vu))  # euler: dx/ds = v
        self.x, self.s, self.rows, self.since = torch.cat(xs), torch.cat(ss).to(dev), caps * len(xs), 0

    def draw(self, tr: Trainer, m: int) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        """``m`` states, their sigmas and caption ids (10% dropped to "", as the data's), rolling out anew every
        ``every`` calls."""
        if self.x is None or self.since >= self.every:
            self.rollout(tr)
        self.since += 1
        pick = torch.randint(0, len(self.rows), (m,))
        ids = [self.ids[caption_or_empty(self.rows[i])] for i in pick.tolist()]
        return self.x[pick.to(self.x.device)], self.s[pick.to(self.s.device)], ids


def flow_objective(sampling, teacher: Teacher | None = None, on_policy: OnPolicy | None = None):
    """``objective(tr, z0, id_lists) -> (loss, per-sample MSE)`` of the flow twin: unweighted velocity MSE
    ``|| (eps - z0) - v(x, 1000 sigma, c, pooled) ||^2`` at ``x = (1 - sigma) z0 + sigma eps`` (ComfyUI's
    ``CONST.noise_scaling``), sigma from :func:`flow_sigmas`. Draws: the logit-normal n, then eps (CPU generator).
    With a ``teacher`` the loss regresses on its velocity (:class:`Teacher`, T1); with ``on_policy`` the batch's first
    rows are the twin's own sampling states (:class:`OnPolicy`), their target the teacher's velocity. The per-sample
    MSE returned (the logged loss) stays the one against ``eps - z0`` on the data's rows, comparable with undistilled
    runs."""

    def objective(tr: Trainer, z0: torch.Tensor, id_lists: list[list[int]]):
        a, dev = tr.a, tr.device
        sigma = flow_sigmas(torch.randn(a.batch), sampling, a.logit_mean, a.logit_std).to(dev)
        eps = torch.randn(a.batch, *z0.shape[1:]).to(dev)
        x = sampling.noise_scaling(sigma, eps, z0)
        m = on_policy.rows_of(a.batch) if on_policy is not None else 0
        if m:
            x_own, s_own, ids_own = on_policy.draw(tr, m)
            x, sigma, id_lists = torch.cat([x_own, x[m:]]), torch.cat([s_own, sigma[m:]]), ids_own + id_lists[m:]
        context, pooled = text_and_pooled(tr.text, id_lists)
        v = tr.unet(x, sampling.timestep(sigma), context=context, y=pooled)
        mse = (v.float()[m:] - (eps - z0)[m:]).square().mean(dim=(1, 2, 3))
        if teacher is None:
            return mse.mean(), mse
        target, covered = teacher.velocity(x, sigma, id_lists, eps - z0)
        assert bool(covered[:m].all()), "on-policy states lie within the teacher's range"
        return (v.float() - target).square().mean(), mse.detach()

    return objective


def train(tr: Trainer, latents: torch.Tensor, captions: list[str], ids: dict, objective, budget_end: float,
          weights: torch.Tensor | None = None) -> str:
    """Train to ``a.steps`` on ``objective`` (:func:`eps_objective`, :func:`flow_objective`), drawing scenes by
    ``weights`` (:func:`scene_weights`); returns why it stopped: "done", "budget" or "signal"."""
    a, dev = tr.a, tr.device
    live = list(tr.unet.parameters()) + list(tr.text.parameters())
    ema = list(tr.ema_unet.parameters()) + list(tr.ema_text.parameters())
    stop, bar, n = _Stop(), _progress(a, tr.step), len(captions)
    start_step, loop_start, t_last = tr.step, time.time(), time.time()
    latents_dev = latents.to(dev)
    while tr.step < a.steps:
        per_step = (time.time() - loop_start) / max(tr.step - start_step, 1)
        if (tr.step > start_step and tr.step % a.save_every == 0
                and time.time() + per_step * a.save_every > budget_end):
            log.warning("stopping at step %d of %d: the %.0f-minute budget would run out before the next "
                        "checkpoint", tr.step, a.steps, a.max_minutes)
            return "budget"
        idx = draw_indices(n, a.batch, weights)  # every random draw on the CPU generator: resumable, device-free
        caps = [caption_or_empty(captions[i]) for i in idx.tolist()]
        loss, mse = objective(tr, latents_dev[idx.to(dev)], [ids[c] for c in caps])
        for g in tr.opt.param_groups:
            g["lr"] = lr_at(tr.step, a.steps, a.lr)
        tr.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.params, 1.0)
        tr.opt.step()
        decay = min(0.999, (1 + tr.step) / (10 + tr.step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, live, 1 - decay)
        tr.losses.append(mse.mean().item())  # the plain eps (flow: velocity) MSE, comparable across weightings
        tr.step += 1
        now = time.time()
        tr.seconds += now - t_last
        t_last = now
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(tr.losses[-100:]):.4f}", refresh=False)
        if tr.step % a.log_every == 0:
            log.info("step %d / %d  loss %.4f  %.2f s/step  lr %.2e", tr.step, a.steps,
                     np.mean(tr.losses[-a.log_every:]), (now - loop_start) / (tr.step - start_step), lr_at(
                         tr.step, a.steps, a.lr))
        if tr.step % a.save_every == 0 or tr.step == a.steps or stop.signal:
            tr.save()
        if stop.signal:
            log.warning("signal %d: checkpoint at step %d written to %s; rerun the command to resume",
                        stop.signal, tr.step, tr.ckpt)
            return "signal"
    if bar is not None:
        bar.close()
    return "done"


def objective_manifest(a: argparse.Namespace, sampling) -> dict:
    """The manifest's record of the loss: eps (as the first model's manifest has it) or flow."""
    if a.family == "eps":
        return {"loss": "eps MSE (unweighted), mean of the last 100 steps", "min_snr_gamma": a.min_snr,
                "offset_noise": a.offset_noise}
    return {"loss": "velocity MSE (eps - z0, unweighted), mean of the last 100 steps",
            "objective": "rectified flow (SD3): x = (1 - sigma) z0 + sigma eps, v-MSE; sigma = shift(sigmoid(n)), "
            "n ~ N(logit_mean, logit_std^2)", "logit_mean": a.logit_mean, "logit_std": a.logit_std,
            "shift": float(sampling.shift)}


def network_manifest(a: argparse.Namespace, M) -> dict:
    if a.family == "eps":
        return {"unet_config": M.ARCHS[a.arch]}
    from . import flow_model as F

    return {"model": "comfy.supported_models.SD3 (MMDiT, CONST, ModelSamplingDiscreteFlow) on SD15 latents",
            "pooled_output": "SDClipModel's, unprojected: the final-layer-normed hidden state at the first EOS token",
            "mmdit_config": F.ARCHS[a.arch]}


def manifest_file(a: argparse.Namespace, out: Path) -> Path:
    """Where the manifest goes: ``manifest.json`` for the eps model (as first committed), ``<stem>.json`` for the
    flow twin (``psedit_toy.model.manifest`` reads either)."""
    return out.parent / "manifest.json" if a.family == "eps" else out.with_suffix(".json")


def export(tr: Trainer, out: Path, digest: str, stopped: str, argv: list[str] | None) -> dict:
    """The EMA weights in fp16 at ``out`` and their manifest beside them (:func:`manifest_file`)."""
    from safetensors.torch import save_file

    from . import model as M

    a, losses = tr.a, tr.losses
    sd = {f"{UNET_KEYS}{k}": v.half().cpu().contiguous() for k, v in tr.ema_unet.state_dict().items()}
    sd.update({f"{TEXT_KEYS}{k}": v.half().cpu().contiguous() for k, v in tr.ema_text.state_dict().items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata={"format": "pt", "psedit_toy": a.world})
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    manifest = {
        **({"family": a.family} if a.family != "eps" else {}),  # (the eps manifest as first committed: no family)
        "file": out.name, "sha256": sha, "bytes": out.stat().st_size, "dtype": "float16 (EMA 0.999 weights)",
        "data_version": a.world, "data_sha256": digest, "scenes": a.scenes, "seed": a.seed,
        "held_out_pairs": sorted(map(list, S.HELD_OUT_PAIRS)), "steps": a.steps, "batch": a.batch, "lr": a.lr,
        **objective_manifest(a, tr.patcher.model.model_sampling), "arch": a.arch,
        "final_loss_mean_last_100": float(np.mean(losses[-100:])), "loss_curve_every_250": [
            float(np.mean(losses[max(0, i - 100):i])) for i in range(250, len(losses) + 1, 250)],
        "train_seconds": round(tr.seconds, 1), "device": tr.trained_on,
        "steps_reached": tr.step, "stopped_by_budget": stopped == "budget",
        **({"distilled_from": a.teacher, "distillation": "velocity regression on the eps model's (T1) where its "
            "sigma range covers the step, from the step it was first given (train.log)"} if getattr(a, "teacher", None)
           else {}),
        **({"on_policy": a.on_policy, "on_policy_note": "this fraction of each batch from the twin's own sampling "
            "states (OnPolicy), the teacher's velocity their target"} if getattr(a, "on_policy", None) else {}),
        **({"init_from": init_record(a.init)} if getattr(a, "init", None) else {}),
        **({"shape_weight": a.shape_weight, "shape_weight_note": "scenes holding these shapes drawn this many times as "
            "often (scene_weights; the on-policy captions too)"} if getattr(a, "shape_weight", None) else {}),
        **network_manifest(a, M), "text_config": M.TEXT_CONFIG, "taesd": "madebyollin/taesd SD1 (real)",
        "command": "python -m psedit_toy.train " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    manifest_file(a, out).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %s (%.1f MB, sha256 %s), final loss %.4f, %.0f s training", out, out.stat().st_size / 1e6,
             sha[:12], manifest["final_loss_mean_last_100"], tr.seconds)
    return manifest


def init_record(path: Path) -> dict:
    """The manifest's record of ``--init``: the file, its sha256 and the steps its own manifest gives."""
    from . import model as M

    info = M.manifest(Path(path))
    return {"file": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
            "steps_reached": info.get("steps_reached", info.get("steps"))}


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    _setup_comfy()
    from . import model as M

    wall0 = time.time()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.export_only:  # the checkpoint's settings (family and network included) before building the network
        saved = checkpoint_config(a.work / "checkpoint.pt")
        if not saved:
            raise SystemExit(f"--export-only: no checkpoint in {a.work}")
        vars(a).update(saved)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tr = Trainer(a, M, device)
    tr.resume()
    if a.export_only:
        a.steps = tr.step
    log.info("training on %s: %s model, world %s, arch %s (%.2f M %s parameters), %d steps of batch %d",
             describe_device(device), a.family, a.world, a.arch, sum(p.numel() for p in tr.unet.parameters()) / 1e6,
             "MMDiT" if a.family == "flow" else "UNet", a.steps, a.batch)
    scenes, latents, digest = load_data(a, M)
    captions = [S.caption(s) for s in scenes]
    weights = scene_weights(scenes, a.shape_weight)
    if weights is not None:
        log.info("shape weights %s: %.0f%% of draws hold a weighted shape", a.shape_weight, 100 * float(
            weights[weights != 1].sum() / weights.sum()))
    ids = {c: token_ids(tr.clip, c) for c in sorted(set(captions)) + [""]}
    check_text_forward(tr, [ids[captions[0]], ids[""]])
    tr.to(device)
    sampling = tr.patcher.model.model_sampling
    if a.family == "flow":
        from . import flow_model as F

        teacher = Teacher(Path(a.teacher), device, a.teacher_max_sigma) if a.teacher else None
        if teacher is not None:
            log.info("distilling from the eps model %s (sha256 %s)", teacher.path, teacher.sha256[:12])
        on_policy = (OnPolicy(sampling, teacher, a.on_policy, captions, ids, latents.shape[1:], weights=weights)
                     if a.on_policy else None)
        objective, default_out = flow_objective(sampling, teacher, on_policy), F.WEIGHTS
    else:
        objective, default_out = eps_objective(sampling.sigmas.float().cpu()), M.WEIGHTS  # SD1.5's 1000 sigmas
    stopped = "done"
    if tr.step < a.steps:
        here = describe_device(device)
        tr.trained_on = here if tr.trained_on in ("", here) else f"{tr.trained_on}; then {here}"
        stopped = train(tr, latents, captions, ids, objective, wall0 + 60 * a.max_minutes, weights)
    if stopped != "signal":
        export(tr, a.out or default_out, digest, stopped, argv)


def check_text_forward(tr: Trainer, probe: list[list[int]]) -> None:
    """Raise unless the training text forward gives what ComfyUI's ``SDClipModel`` gives: the token sequence, and
    for the flow twin the pooled vector too."""
    with torch.no_grad():
        ours, theirs = text_and_pooled(tr.text, probe), tr.text.clip_l(probe)
        parts = 2 if tr.a.family == "flow" else 1
        err = max((ours[i] - theirs[i]).abs().max().item() for i in range(parts))
    if err > 1e-4:
        raise RuntimeError(f"training text forward differs from ComfyUI's by {err:.2e}")


if __name__ == "__main__":
    main()
