"""Command line: ``psedit edit`` (one photo) and ``psedit eval`` (the paper's table over a folder of photos)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from . import pipeline
from .errors import SetupError

log = logging.getLogger("psedit")

CONFIG_CHOICES = ("nulltext", "textopt", "perceptual")
LOCAL_RAY = "local"  # --ray without an address: start Ray on this machine


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="psedit", description="PSEdit: faithful text-guided editing of real photos "
                                "(arXiv 2312.06680) on an SD1.x or SDXL checkpoint, with ComfyUI as a library.")
    sub = p.add_subparsers(dest="command", required=True)
    common = _common_options()
    e = sub.add_parser("edit", parents=[common], help="edit one photo (default: the full method, perceptual + text)")
    e.add_argument("--image", required=True, type=Path, help="the photo")
    e.add_argument("--source", required=True, help="what the photo shows, e.g. 'a cat on a sofa'")
    e.add_argument("--edit", required=True, help="what it should show, e.g. 'a tiger on a sofa'")
    e.add_argument("--config", default="perceptual", choices=CONFIG_CHOICES,
                   help="nulltext: plain CFG on the edit caption; textopt: text guidance optimisation; "
                   "perceptual: textopt + LPIPS guidance (default)")
    e.add_argument("--out", required=True, type=Path, help="where to write the edited PNG")
    v = sub.add_parser("eval", parents=[common], help="the paper's three configurations over a folder, with metrics")
    v.add_argument("--images", required=True, type=Path, help="folder of photos")
    v.add_argument("--captions", required=True, type=Path, help="CSV with the header image,source,edit")
    v.add_argument("--clip", required=True, type=Path,
                   help="local CLIP folder in transformers format for CLIPScore (e.g. openai/clip-vit-large-patch14 "
                   "saved with save_pretrained)")
    v.add_argument("--out", required=True, type=Path, help="output folder (run again with it to resume)")
    v.add_argument("--ray", nargs="?", const=LOCAL_RAY, metavar="ADDRESS",
                   help="spread the photos over Ray workers, one per GPU (one per CPU slot without GPUs), each loading "
                   "ComfyUI and the checkpoint once: 'auto' or HOST:PORT joins a running Ray cluster, no ADDRESS "
                   "starts a local Ray on this machine (needs pip install \"psedit[ray]\")")
    v.add_argument("--workers", type=int, metavar="N",
                   help="with --ray: how many workers (default: one per GPU of the cluster, one per CPU without GPUs)")
    return p


def _common_options() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("--comfyui", help="ComfyUI checkout used as a library (default: $COMFYUI_PATH)")
    c.add_argument("--checkpoint", required=True, type=Path, help="SD1.x or SDXL checkpoint (.safetensors / .ckpt)")
    c.add_argument("--steps", type=int, default=50, help="sampling (and inversion) steps (default 50)")
    c.add_argument("--scheduler", default="ddim_uniform",
                   help="ComfyUI scheduler name (default ddim_uniform, the reference code's DDIM timesteps)")
    c.add_argument("--gamma", type=float, default=7.5, help="text guidance scale, CFG (default 7.5)")
    c.add_argument("--beta", type=float, default=None, help="edit strength, source -> edit caption (default: the "
                   "workflows', 1 with the full gradient (SD1.x / SD2.x), the paper's 3 with x0)")
    c.add_argument("--text-window", type=float, nargs=2, default=[0.0, 0.4], metavar=("START", "END"),
                   help="fraction of the steps with text guidance optimisation (default 0 0.4)")
    c.add_argument("--perceptual-window", type=float, nargs=2, default=[0.2, 0.8], metavar=("START", "END"),
                   help="fraction of the steps with perceptual guidance (default 0.2 0.8)")
    c.add_argument("--strength", type=float, default=None, help="perceptual guidance step, RMS change of the x0 "
                   "prediction per step (default: the workflows', 3 with the full gradient, 1 with x0)")
    c.add_argument("--gradient", default="auto", choices=["auto", "x0", "full"],
                   help="perceptual guidance gradient: full (through the model too, the paper's; more memory and "
                   "time), x0 (through the decoder only), auto (default: the workflows' choice, full on SD1.x / "
                   "SD2.x, x0 on SDXL)")
    c.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex", "squeeze"], help="LPIPS trunk for guidance")
    c.add_argument("--decoder", default="taesd", choices=["taesd", "vae"],
                   help="decoder inside perceptual guidance (taesd needs models/vae_approx/taesd_decoder.*)")
    c.add_argument("--method", default="null-text", choices=["null-text", "negative-prompt", "none"],
                   help="how the photo is made to reconstruct at gamma (none: plain DDIM inversion)")
    c.add_argument("--inner-iterations", type=int, default=10, help="null-text Adam iterations per step (default 10)")
    c.add_argument("--refine", type=int, default=2, help="DDIM inversion fixed-point iterations (default 2)")
    c.add_argument("--resize", type=int, default=0, metavar="PX",
                   help="scale the photo so its shorter side is PX (Lanczos) first; 0 keeps its size (default). "
                   "Then it is centre-cropped so both sides are multiples of 8 (at most 7 px cut)")
    c.add_argument("--seed", type=int, default=0, help="torch seed (the method itself is deterministic)")
    c.add_argument("--lpips-dir", action="append", default=[], type=Path,
                   help="extra folder with LPIPS trunk weights (besides ComfyUI's models/lpips); repeatable")
    c.add_argument("-v", "--verbose", action="store_true", help="log progress details (and tracebacks on errors)")
    return c


def settings_from(a) -> pipeline.Settings:
    if a.steps < 1:
        raise SetupError(f"--steps must be at least 1, got {a.steps}")
    for name in ("gamma", "beta", "strength"):
        if getattr(a, name) is not None and not math.isfinite(getattr(a, name)):
            raise SetupError(f"--{name} must be a finite number")
    for name in ("text_window", "perceptual_window"):
        start, end = getattr(a, name)
        if not 0 <= start < end <= 1:
            raise SetupError(f"--{name.replace('_', '-')} {start} {end}: need 0 <= START < END <= 1 (fractions of "
                             "the steps)")
    if a.inner_iterations < 0 or a.refine < 0 or a.resize < 0:
        raise SetupError("--inner-iterations, --refine and --resize must not be negative")
    return pipeline.Settings(
        steps=a.steps, scheduler=a.scheduler, gamma=a.gamma, beta=a.beta, text_window=tuple(a.text_window),
        perceptual_window=tuple(a.perceptual_window), strength=a.strength, gradient=a.gradient,
        lpips_net=a.lpips_net, decoder=a.decoder, method=a.method, inner_iterations=a.inner_iterations,
        refine=a.refine, resize=a.resize, seed=a.seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return run(args)
    except SetupError as exc:
        return _fail(str(exc), args.verbose)
    except (FileNotFoundError, ValueError) as exc:  # the nodes' input checks: their messages name the fix
        return _fail(f"{exc} (--verbose shows where)" if not args.verbose else str(exc), args.verbose)
    except KeyboardInterrupt:
        sys.stderr.write("psedit: interrupted; finished results are kept, run the same command again to resume\n")
        return 130


def _fail(message: str, verbose: bool) -> int:
    if verbose:
        log.exception("psedit failed")
    sys.stderr.write(f"psedit: {message}\n")
    return 2


def run(args) -> int:
    settings = settings_from(args)
    if not args.checkpoint.is_file():
        raise SetupError(f"checkpoint {args.checkpoint} does not exist: pass an SD1.x or SDXL .safetensors/.ckpt")
    if args.command == "eval":
        from .clip_metrics import ClipEmbedder, check_folder
        from .evaluate import read_captions

        items = read_captions(args.captions, args.images)
        if args.ray is not None:
            check_folder(args.clip)  # each worker loads CLIP itself; this process needs no model
            return run_eval_ray(args, settings, items)
        if args.workers is not None:
            raise SetupError("--workers is the number of Ray workers: pass it with --ray")
        clip = ClipEmbedder(args.clip, device=torch_device())  # fails early, before the checkpoint loads
    lpips_dirs = setup_host(args.comfyui, settings.scheduler, args.lpips_dir)
    if args.command == "edit":
        return run_edit(args, settings)
    return run_eval(args, settings, items, clip, lpips_dirs)


def setup_host(comfyui, scheduler: str, lpips_dirs) -> list[str]:
    """ComfyUI as a library with this pack's nodes, the scheduler name checked and the extra LPIPS folders registered
    (Perceptual Guidance looks there too); returns every folder searched for LPIPS trunks. Run once per process: by
    the command itself, or by each Ray worker."""
    pack = pipeline.setup_comfy(comfyui)
    _check_scheduler(scheduler)
    pack.nodes._comfy.register_lpips_dirs([str(d) for d in lpips_dirs])
    return pack.nodes._comfy.lpips_search_dirs()


def run_edit(args, settings: pipeline.Settings) -> int:
    from .images import load_photo, save_image

    image = load_photo(args.image, settings.resize)
    models = pipeline.load_checkpoint(args.checkpoint)
    prepared = pipeline.prepare(models, image, args.source, args.edit, settings)
    save_image(pipeline.run_config(args.config, models, prepared, settings), args.out)
    sys.stdout.write(f"wrote {args.out} ({image.shape[2]}x{image.shape[1]}, {args.config})\n")
    return 0


def run_eval(args, settings: pipeline.Settings, items, clip, lpips_dirs) -> int:
    from .evaluate import Metrics, evaluate

    metrics = Metrics(clip, lpips_dirs, device=torch_device())  # LPIPS alex: fails early too
    models = pipeline.load_checkpoint(args.checkpoint)
    with _progress(len(items)) as bar:
        rows = evaluate(models, items, args.out, settings, metrics, progress=bar)
    return _report(rows, items, args.out)


def run_eval_ray(args, settings: pipeline.Settings, items) -> int:
    """``eval --ray``: the same run, its photos spread over Ray workers (``psedit_cli.distributed``)."""
    from . import distributed

    if args.workers is not None and args.workers < 1:
        raise SetupError(f"--workers must be at least 1, got {args.workers}")
    spec = distributed.WorkerSpec.from_args(args, loader=pipeline.load_checkpoint)
    with _progress(len(items)) as bar:
        rows = distributed.evaluate_on_ray(spec, items, args.out, settings, address=args.ray, workers=args.workers,
                                           progress=bar)
    return _report(rows, items, args.out)


@contextmanager
def _progress(photos: int):
    """A progress bar over photos x configurations, with log lines printed above it."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(), tqdm(total=photos * len(pipeline.CONFIGS), desc="psedit eval", unit="edit") as bar:
        yield bar


def _report(rows: list[dict], items, out: Path) -> int:
    sys.stdout.write(f"{len(rows)} edits of {len(items)} photos in {out}; results.csv, table.csv, table.md:\n")
    sys.stdout.write((out / "table.md").read_text(encoding="utf-8"))
    return 0


def torch_device() -> torch.device:
    if "comfy.model_management" in sys.modules:
        import comfy.model_management

        return comfy.model_management.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_scheduler(name: str) -> None:
    import comfy.samplers

    if name not in comfy.samplers.SCHEDULER_NAMES:
        raise SetupError(f"--scheduler {name!r} is not one of ComfyUI's: {', '.join(comfy.samplers.SCHEDULER_NAMES)}")


if __name__ == "__main__":
    sys.exit(main())
