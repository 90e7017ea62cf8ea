"""The TAESD tiny autoencoder architecture (madebyollin/taesd), written out for core tests only.

Keys match ComfyUI's ``models/vae_approx`` files (``0.weight``, ``1.conv.0.weight``, ...). Latents are in
*scaled* (model) space, images in [0, 1].
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn


def _conv(n_in, n_out, **kw):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class _Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def encoder(latent_channels: int = 4) -> nn.Sequential:
    def down():
        return [_conv(64, 64, stride=2, bias=False), _Block(64, 64), _Block(64, 64), _Block(64, 64)]

    return nn.Sequential(_conv(3, 64), _Block(64, 64), *down(), *down(), *down(), _conv(64, latent_channels))


def decoder(latent_channels: int = 4) -> nn.Sequential:
    def up():
        return [nn.Upsample(scale_factor=2), _conv(64, 64, bias=False)]

    blocks = [_Block(64, 64), _Block(64, 64), _Block(64, 64)]
    return nn.Sequential(
        _Clamp(), _conv(latent_channels, 64), nn.ReLU(),
        *blocks, *up(), _Block(64, 64), _Block(64, 64), _Block(64, 64), *up(),
        _Block(64, 64), _Block(64, 64), _Block(64, 64), *up(), _Block(64, 64), _conv(64, 3),
    )


def load(path, module: nn.Module) -> nn.Module:
    module.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return module.float().eval().requires_grad_(False)
