"""Command line: ``psedit edit`` (one photo) and ``psedit eval`` (the paper's table over a folder)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .pipeline import Settings, SetupError

log = logging.getLogger("psedit")


def _settings(a) -> Settings:
    return Settings(steps=a.steps, scheduler=a.scheduler, gamma=a.gamma, beta=a.beta,
                    text_window=tuple(a.text_window), perceptual_window=tuple(a.perceptual_window),
                    strength=a.strength, lpips_net=a.lpips_net, decoder=a.decoder, method=a.method,
                    inner_iterations=a.inner_iterations, refine=a.refine)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="psedit", description="PSEdit: faithful text-guided editing of real photos.")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--comfyui", help="ComfyUI checkout used as a library (default: $COMFYUI_PATH)")
    common.add_argument("--checkpoint", required=True, help="SD1.x or SDXL checkpoint (.safetensors / .ckpt)")
    common.add_argument("--steps", type=int, default=50)
    common.add_argument("--scheduler", default="normal")
    common.add_argument("--gamma", type=float, default=7.5, help="text guidance scale (CFG)")
    common.add_argument("--beta", type=float, default=3.0, help="edit strength")
    common.add_argument("--text-window", type=float, nargs=2, default=[0.0, 0.4], metavar=("START", "END"))
    common.add_argument("--perceptual-window", type=float, nargs=2, default=[0.2, 0.8], metavar=("START", "END"))
    common.add_argument("--strength", type=float, default=0.1, help="perceptual guidance step (normalised)")
    common.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex", "squeeze"])
    common.add_argument("--decoder", default="taesd", choices=["taesd", "vae"])
    common.add_argument("--method", default="null-text", choices=["null-text", "negative-prompt", "none"])
    common.add_argument("--inner-iterations", type=int, default=10)
    common.add_argument("--refine", type=int, default=2, help="DDIM inversion fixed-point iterations")
    common.add_argument("--lpips-dir", action="append", default=[], help="folder holding LPIPS trunk weights")
    common.add_argument("-v", "--verbose", action="store_true")
    e = sub.add_parser("edit", parents=[common], help="edit one photo (the full method: perceptual + text)")
    e.add_argument("--image", required=True, type=Path)
    e.add_argument("--source", required=True, help="what the photo shows")
    e.add_argument("--edit", required=True, help="what it should show")
    e.add_argument("--config", default="perceptual", choices=["nulltext", "textopt", "perceptual"])
    e.add_argument("--out", required=True, type=Path)
    v = sub.add_parser("eval", parents=[common], help="the paper's three configurations over a folder, with metrics")
    v.add_argument("--images", required=True, type=Path, help="folder of photos")
    v.add_argument("--captions", required=True, type=Path, help="CSV with header image,source,edit")
    v.add_argument("--clip", required=True, type=Path, help="local CLIP folder (transformers format) for metrics")
    v.add_argument("--out", required=True, type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return _run(args)
    except SetupError as exc:
        sys.stderr.write(f"psedit: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("psedit: interrupted; finished results are kept, run the same command again to resume\n")
        return 130


def _run(args) -> int:
    from .pipeline import load_checkpoint, setup_comfy

    if args.command == "eval":
        from .evaluate import ClipEmbedder, read_captions

        items = read_captions(args.captions, args.images)
        clip = ClipEmbedder(args.clip)  # fail early, before the checkpoint loads
    elif not args.image.is_file():
        raise SetupError(f"image {args.image} does not exist")
    pack = setup_comfy(args.comfyui)
    models = load_checkpoint(args.checkpoint)
    settings = _settings(args)
    pack.nodes._comfy.register_lpips_dirs(args.lpips_dir)  # so Perceptual Guidance finds them too
    lpips_dirs = pack.nodes._comfy.lpips_search_dirs()
    if args.command == "edit":
        from .evaluate import load_image, save_image
        from .pipeline import prepare, run_config

        prepared = prepare(models, load_image(args.image), args.source, args.edit, settings)
        save_image(run_config(args.config, models, prepared, settings), args.out)
        sys.stdout.write(f"wrote {args.out}\n")
        return 0
    from tqdm import tqdm

    from .evaluate import evaluate

    with tqdm(total=len(items) * 3, desc="psedit eval", unit="edit") as bar:
        evaluate(models, items, args.out, settings, clip, lpips_dirs=lpips_dirs, progress=bar)
    sys.stdout.write((args.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
