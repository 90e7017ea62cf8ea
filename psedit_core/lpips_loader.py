"""LPIPS (Zhang et al. 2018) built offline-first: lazy, cached, fp32, frozen, quiet.

The ``lpips`` wheel ships the small linear heads; the ImageNet trunk (AlexNet, VGG16 or SqueezeNet 1.1 features)
normally comes from torchvision's download at first use, which fails offline and surprises users. Here the trunk
is looked up in this order:

1. an explicit file (``trunk_path``);
2. the folders in ``search_dirs`` (e.g. ComfyUI's ``models/lpips``), by the names in :data:`TRUNK_FILENAMES`;
3. the torch hub cache (``torch.hub.get_dir()/checkpoints``), where torchvision keeps its downloads;
4. torchvision's download, only when ``allow_download`` is true;

and when nothing is found an :class:`LPIPSWeightsNotFoundError` names the file to get and where to put it.
A trunk file is a torchvision state dict: ``features.*`` keys, with or without ``classifier.*``.
Nothing is built at import time; models are cached per (net, file, device, spatial).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.utils.checkpoint

__all__ = [
    "LPIPS_NETS",
    "LPIPSWeightsNotFoundError",
    "TRUNK_FILENAMES",
    "checkpoint_trunk",
    "find_trunk_file",
    "get_lpips",
    "load_trunk_state_dict",
]

log = logging.getLogger(__name__)

LPIPS_NETS = ("alex", "vgg", "squeeze")

#: Accepted trunk file names per net: a features-only file, then torchvision's own checkpoint name.
TRUNK_FILENAMES: dict[str, tuple[str, ...]] = {
    "alex": ("alexnet_features.pth", "alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16_features.pth", "vgg16-397923af.pth"),
    "squeeze": ("squeezenet1_1_features.pth", "squeezenet1_1-b8a52dc0.pth"),
}

_DOWNLOAD_URL = "https://download.pytorch.org/models/{}"


class LPIPSWeightsNotFoundError(FileNotFoundError):
    """No LPIPS trunk weights could be found (and downloading was not allowed or failed)."""


def _check_net(net: str) -> None:
    if net not in LPIPS_NETS:
        raise ValueError(f"unknown LPIPS net {net!r}: use one of {', '.join(LPIPS_NETS)}")


def find_trunk_file(net: str, search_dirs: Iterable[str | os.PathLike] = ()) -> Path | None:
    """The first trunk file for ``net`` in ``search_dirs``, then in the torch hub cache, or ``None``."""
    _check_net(net)
    dirs = [Path(d) for d in search_dirs]
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    for d in dirs:
        for name in TRUNK_FILENAMES[net]:
            candidate = d / name
            if candidate.is_file():
                return candidate
    return None


def load_trunk_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``features.*`` tensors of a torchvision checkpoint (``classifier.*`` and the rest are dropped)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ValueError(
            f"{path} holds no 'features.*' tensors: expected a torchvision AlexNet/VGG16/SqueezeNet1.1 checkpoint"
        )
    return features


def _load_trunk(model: torch.nn.Module, features: dict[str, torch.Tensor], source: str) -> None:
    """Copy torchvision ``features.N.rest`` tensors into lpips' ``net.sliceK.N.rest`` parameters."""
    trunk = model.net.state_dict()
    by_feature = {}
    for key in trunk:
        _slice, index, rest = key.split(".", 2)
        by_feature[f"features.{index}.{rest}"] = key
    missing = sorted(set(by_feature) - set(features))
    if missing:
        raise ValueError(f"{source} does not match this LPIPS trunk: missing {missing[:4]}")
    for feature_key, trunk_key in by_feature.items():
        value = features[feature_key]
        if value.shape != trunk[trunk_key].shape:
            raise ValueError(
                f"{source}: {feature_key} has shape {tuple(value.shape)}, expected {tuple(trunk[trunk_key].shape)}"
            )
        trunk[trunk_key] = value.float()
    model.net.load_state_dict(trunk)


def _not_found_message(net: str, search_dirs: Iterable[str | os.PathLike], reason: str) -> str:
    where = [str(d) for d in search_dirs] + [str(Path(torch.hub.get_dir()) / "checkpoints")]
    tv_name = TRUNK_FILENAMES[net][-1]
    return (
        f"LPIPS '{net}' needs ImageNet trunk weights and none were found ({reason}). "
        f"Download {_DOWNLOAD_URL.format(tv_name)} and put it (as '{tv_name}', or a features-only copy as "
        f"'{TRUNK_FILENAMES[net][0]}') in one of: {', '.join(where)}"
    )


def _build(net: str, spatial: bool, trunk_file: Path | None, search_dirs: tuple[str, ...], allow_download: bool):
    import lpips  # deferred: importing lpips is cheap but its constructors are not

    path = trunk_file if trunk_file is not None else find_trunk_file(net, search_dirs)
    with warnings.catch_warnings():  # torchvision's 'pretrained is deprecated' chatter, from inside lpips
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = _construct(lpips, net, spatial, path, search_dirs, allow_download)
    return model.float().eval().requires_grad_(False)


def _construct(lpips, net, spatial, path, search_dirs, allow_download):
    if path is not None:
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, spatial=spatial, verbose=False)
        _load_trunk(model, load_trunk_state_dict(path), str(path))
        log.info("LPIPS %s trunk loaded from %s", net, path)
    elif allow_download:
        log.info("LPIPS %s trunk not found locally; letting torchvision download it", net)
        try:
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=False, spatial=spatial, verbose=False)
        except Exception as exc:  # URLError, OSError, RuntimeError from the hub: all mean "offline"
            raise LPIPSWeightsNotFoundError(_not_found_message(net, search_dirs, f"download failed: {exc}")) from exc
    else:
        raise LPIPSWeightsNotFoundError(_not_found_message(net, search_dirs, "downloads are off"))
    return model


def _checkpointed_forward(seq: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.utils.checkpoint.checkpoint(torch.nn.Sequential.forward, seq, x, use_reentrant=False)
    return torch.nn.Sequential.forward(seq, x)


def checkpoint_trunk(model: torch.nn.Module) -> torch.nn.Module:
    """Make each trunk slice of an ``lpips.LPIPS`` model recompute its inner activations in backward instead of
    keeping them (gradient checkpointing): when the input asks for a gradient, a slice keeps only its input and
    output, so a 1024-px VGG loss holds a fraction of the activations for the same gradient. Values, gradients and
    parameter names are unchanged; without gradients nothing changes at all."""
    for i in range(1, model.net.N_slices + 1):
        seq = getattr(model.net, f"slice{i}")
        seq.forward = functools.partial(_checkpointed_forward, seq)
    return model


@functools.lru_cache(maxsize=8)
def _cached(net, spatial, trunk_file, search_dirs, allow_download, device):
    # Built outside inference mode (hosts like ComfyUI run nodes inside it) so gradients can flow through it.
    with torch.inference_mode(False):
        return checkpoint_trunk(_build(net, spatial, trunk_file, search_dirs, allow_download)).to(device)


def get_lpips(
    net: str = "alex",
    *,
    trunk_path: str | os.PathLike | None = None,
    search_dirs: Iterable[str | os.PathLike] = (),
    allow_download: bool = True,
    spatial: bool = False,
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """A frozen fp32 ``lpips.LPIPS`` model with real trunk weights, cached.

    Args:
        net: ``"alex"`` (the recommended metric), ``"vgg"`` (the recommended optimisation loss) or ``"squeeze"``.
        trunk_path: an explicit torchvision checkpoint to use; must exist.
        search_dirs: folders to look in before the torch hub cache.
        allow_download: let torchvision download the trunk when no file is found.
        spatial: return a per-pixel distance map (for masked losses) instead of one value per image.
        device: where the model lives.

    The returned module is shared: do not modify it.
    """
    _check_net(net)
    trunk_file = None
    if trunk_path is not None:
        trunk_file = Path(trunk_path)
        if not trunk_file.is_file():
            raise LPIPSWeightsNotFoundError(f"LPIPS trunk file {trunk_file} does not exist")
    dirs = tuple(str(d) for d in search_dirs)
    return _cached(net, spatial, trunk_file, dirs, allow_download, str(torch.device(device)))
