"""Perceptual behaviour with the real pretrained files in ../shared/weights (LPIPS trunks, TAESD SD1)."""

import io

import numpy as np
import pytest
import taesd_arch
import torch
from PIL import Image, ImageFilter

from psedit_core.analytic import GaussianData
from psedit_core.inversion import euler_sample
from psedit_core.lpips_loader import get_lpips
from psedit_core.metrics import lpips_distance, psnr
from psedit_core.perceptual import PerceptualGuidanceConfig, lpips_loss, perceptual_guidance

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (test extra) provides the test photo")


def photo(size: int) -> Image.Image:
    return Image.fromarray(skimage_data.astronaut()).resize((size, size), Image.LANCZOS)


def to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(buf).convert("RGB")


@pytest.fixture(scope="module")
def degraded():
    im = photo(256)
    x = to_tensor(im)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return x, {
        "jpeg20": to_tensor(jpeg(im, 20)),
        "blur1.5": to_tensor(im.filter(ImageFilter.GaussianBlur(1.5))),
        "blur4": to_tensor(im.filter(ImageFilter.GaussianBlur(4))),
        "noise": (x + 0.5 * noise).clamp(0, 1),
    }


@pytest.mark.parametrize("net", ["alex", "squeeze", "vgg"])
def test_lpips_orders_degradations(lpips_dir, degraded, net):
    x, variants = degraded
    model = get_lpips(net, search_dirs=[lpips_dir], allow_download=False)
    d = {k: lpips_distance(model, v, x).item() for k, v in variants.items()}
    assert d["jpeg20"] < d["blur1.5"] < d["blur4"] < d["noise"], d
    assert d["blur1.5"] > 0.1, d  # a random trunk gives ~0.015 here


def test_squeeze_values_match_reference(lpips_dir, degraded):
    """../shared/weights/README.md: squeeze LPIPS vs blur 1.5 = 0.23, blur 4 = 0.59, JPEG q20 = 0.11."""
    x, variants = degraded
    model = get_lpips("squeeze", search_dirs=[lpips_dir], allow_download=False)
    assert lpips_distance(model, variants["jpeg20"], x).item() == pytest.approx(0.11, abs=0.03)
    assert lpips_distance(model, variants["blur1.5"], x).item() == pytest.approx(0.23, abs=0.04)
    assert lpips_distance(model, variants["blur4"], x).item() == pytest.approx(0.59, abs=0.05)


class TaesdScene:
    """A real photo, its real TAESD latent, and a perturbed copy of that latent."""

    def __init__(self, taesd_dir, lpips_dir):
        self.encoder = taesd_arch.load(taesd_dir / "taesd_encoder.safetensors", taesd_arch.encoder())
        self.decoder = taesd_arch.load(taesd_dir / "taesd_decoder.safetensors", taesd_arch.decoder())
        self.image = to_tensor(photo(128))
        with torch.no_grad():
            self.z_src = self.encoder(self.image)
        g = torch.Generator().manual_seed(0)
        self.z_pert = self.z_src + 0.7 * torch.randn(self.z_src.shape, generator=g)
        self.loss = lpips_loss(get_lpips("vgg", search_dirs=[lpips_dir], allow_download=False), self.image)
        self.metric = get_lpips("alex", search_dirs=[lpips_dir], allow_download=False)

    def decode(self, z):
        return self.decoder(z).clamp(0, 1)

    def scores(self, z):
        with torch.no_grad():
            img = self.decode(z)
        return lpips_distance(self.metric, img, self.image).item(), psnr(img, self.image).item()


@pytest.fixture(scope="module")
def scene(taesd_dir, lpips_dir):
    return TaesdScene(taesd_dir, lpips_dir)


def test_taesd_reconstructs_photo(scene):
    lp, db = scene.scores(scene.z_src)
    assert db > 17 and lp < 0.2, (lp, db)


def test_guidance_steps_pull_perturbed_latent_toward_photo(scene):
    guided = perceptual_guidance(lambda x, sigma: x, scene.decode, scene.loss,
                                 PerceptualGuidanceConfig(scale=0.1, step="normalized", target="x0"))
    x = scene.z_pert  # the identity denoiser, corrected on x0: 10 plain gradient steps on the latent
    for _ in range(10):
        x = guided(x, torch.tensor([0.1]))
    (lp0, db0), (lp1, db1) = scene.scores(scene.z_pert), scene.scores(x)
    assert lp1 < 0.8 * lp0 and db1 > db0 + 0.3, ((lp0, db0), (lp1, db1))


def test_guided_sampling_ends_closer_to_photo(scene):
    """Sampling a model that believes in the perturbed latent: guidance brings the result nearer the photo."""
    model = GaussianData(scene.z_pert, torch.full_like(scene.z_pert, 0.5))
    ramp = torch.linspace(0, 1, 10)
    sigmas = torch.cat([(3.0 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 3.0 ** (1 / 7))) ** 7, torch.zeros(1)])
    x_start = scene.z_pert + 3.0 * torch.randn(scene.z_pert.shape, generator=torch.Generator().manual_seed(1))
    plain = euler_sample(model.denoiser, x_start, sigmas)
    config = PerceptualGuidanceConfig(scale=0.3, step="normalized")
    guided = euler_sample(perceptual_guidance(model.denoiser, scene.decode, scene.loss, config), x_start, sigmas)
    (lp0, db0), (lp1, db1) = scene.scores(plain), scene.scores(guided)
    assert lp1 < 0.9 * lp0 and db1 > db0 + 0.2, ((lp0, db0), (lp1, db1))
