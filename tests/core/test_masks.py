import pytest
import torch

from psedit_core.analytic import GaussianData
from psedit_core.inversion import ddim_invert, euler_sample
from psedit_core.masks import (
    accumulate_difference,
    edit_mask,
    fit_mask,
    gaussian_blur,
    masked_perceptual_loss,
    normalise,
    resize_mask,
)
from psedit_core.perceptual import PerceptualGuidanceConfig, perceptual_guidance

H = 16


def box(h=H, lo=4, hi=12):
    r = torch.zeros(1, 1, h, h)
    r[..., lo:hi, lo:hi] = 1
    return r


def test_blur_and_normalise():
    a = torch.zeros(1, 1, 9, 9)
    a[..., 4, 4] = 1.0
    b = gaussian_blur(a, 1.0)
    assert b.sum().item() == pytest.approx(1.0, abs=1e-5)  # mass kept (far from the border)
    assert b[..., 4, 4] < 0.2 and b[..., 4, 5] > 0.05  # spread to the neighbours
    assert torch.allclose(gaussian_blur(torch.full((1, 1, 5, 5), 3.0), 2.0), torch.full((1, 1, 5, 5), 3.0))
    n = normalise(torch.tensor([[[[2.0, 4.0], [6.0, 10.0]]]]))
    assert n.flatten().tolist() == pytest.approx([0.0, 0.25, 0.5, 1.0])
    assert normalise(torch.ones(1, 1, 3, 3)).abs().sum() == 0


def test_edit_mask_recovers_region_from_prediction_differences():
    g = torch.Generator().manual_seed(0)
    region = box()
    pairs = []
    for _ in range(4):
        src = torch.randn(1, 4, H, H, generator=g)
        edit = src + region * 2.0 * torch.randn(1, 4, H, H, generator=g) + 0.1 * torch.randn(1, 4, H, H, generator=g)
        pairs.append((edit, src))
    m = edit_mask(pairs, blur=1.0, threshold=0.3)
    inter, union = (m * region).sum(), ((m + region) > 0).sum()
    assert inter / union > 0.8
    soft = edit_mask(pairs, threshold=None)
    assert soft.min() == 0 and soft.max() == 1 and ((soft > 0) & (soft < 1)).any()
    assert accumulate_difference(pairs).shape == (1, 1, H, H)
    with pytest.raises(ValueError, match="at least one"):
        accumulate_difference([])
    with pytest.raises(ValueError, match="threshold"):
        edit_mask(pairs, threshold=1.5)


def test_resize_mask_shapes():
    m = torch.zeros(2, 8, 8)
    m[:, 2:6, 2:6] = 1
    r = resize_mask(m, (16, 16))
    assert r.shape == (2, 1, 16, 16) and r.max() <= 1 and r.min() >= 0
    assert r[0, 0, 8, 8] == 1 and r[0, 0, 0, 0] == 0


def test_fit_mask_crops_a_photo_sized_mask_as_vae_encode_crops_the_photo():
    """A 68x70 photo encodes to 64x64 pixels: VAEEncode drops (68 % 8) // 2 = 2 rows / 3 columns first."""
    photo_mask = torch.zeros(1, 68, 70)
    photo_mask[:, 2:4, 3:5] = 1  # the first pixels that survive the crop
    m = fit_mask(photo_mask, (64, 64))
    assert m.shape == (1, 1, 64, 64)
    assert m[0, 0, :2, :2].tolist() == [[1.0, 1.0], [1.0, 1.0]] and m.sum() == 4  # exact: no stretch, no blur


def test_fit_mask_refuses_another_aspect_ratio():
    """A portrait mask for a square-cropped photo cannot be placed: the error names the fix."""
    with pytest.raises(ValueError, match="scale and crop the mask with the same nodes"):
        fit_mask(torch.zeros(1, 768, 512), (512, 512))


@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_fit_mask_shrinks_by_area_so_thin_strokes_survive_anywhere(offset):
    """A 2-px stroke on a mask 4x the image's size keeps its weight (half a pixel of area) wherever it lies;
    point sampling (nearest / plain bilinear) keeps all of it or none of it depending on the offset."""
    big = torch.zeros(1, 256, 256)
    big[:, 100:160, 40 + offset:42 + offset] = 1
    m = fit_mask(big, (64, 64))
    assert m.sum().item() == pytest.approx(big.sum().item() / 16, rel=0.05)
    assert m.max() > 0.2


def test_fit_mask_grows_a_small_mask_of_the_same_aspect():
    small = torch.zeros(2, 8, 12)
    small[:, 2:6, 3:9] = 1
    m = fit_mask(small, (32, 48))
    assert m.shape == (2, 1, 32, 48) and m[0, 0, 16, 24] == 1 and m[0, 0, 0, 0] == 0


class Scene:
    """Analytic edit: the edit model moves the box region far (the edit) and the rest a little (drift)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.region = box()
        self.z_src = torch.randn(1, 4, H, H, generator=g)
        shift = torch.randn(1, 4, H, H, generator=g)
        edit_mu = self.z_src + 2.0 * shift * self.region + 0.3 * torch.randn(1, 4, H, H, generator=g)
        s = torch.full((1, 4, H, H), 0.3)
        self.edit_model = GaussianData(edit_mu, s)
        self.weight = torch.randn(3, 4, 1, 1, generator=g) * 0.5
        self.src_img, self.edit_img = self.decode(self.z_src), self.decode(edit_mu)
        ramp = torch.linspace(0, 1, 20)
        self.sigmas = torch.cat([(14.6 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7, torch.zeros(1)])
        self.x_T = ddim_invert(GaussianData(self.z_src, s).denoiser, self.z_src, self.sigmas, refine=5).inverted

    def decode(self, z):
        return torch.sigmoid(torch.nn.functional.conv2d(z, self.weight))

    def run(self, loss=None, scale=0.05):
        d = self.edit_model.denoiser
        if loss is not None:
            d = perceptual_guidance(d, self.decode, loss, PerceptualGuidanceConfig(scale, step="normalized"))
        return self.decode(euler_sample(d, self.x_T, self.sigmas))

    def psnr(self, a, b, inside: bool):
        m = self.region if inside else 1 - self.region
        return (10 * torch.log10(m.sum() * 3 / ((a - b).pow(2) * m).sum())).item()


def test_masked_guidance_protects_outside_and_frees_inside():
    scene = Scene()
    none = scene.run()
    whole = scene.run(masked_perceptual_loss(None, scene.src_img, torch.zeros(1, 1, H, H), pixel_weight=1.0))
    masked = scene.run(masked_perceptual_loss(None, scene.src_img, scene.region, pixel_weight=1.0))
    out = {k: scene.psnr(v, scene.src_img, inside=False) for k, v in (("none", none), ("whole", whole),
                                                                        ("masked", masked))}
    inside = {k: scene.psnr(v, scene.edit_img, inside=True) for k, v in (("none", none), ("whole", whole),
                                                                           ("masked", masked))}
    assert out["masked"] > out["whole"] + 3 > out["none"] + 3, out  # outside: closest to the source
    assert inside["masked"] >= inside["none"] - 0.1, inside  # inside: as far toward the edit as unguided
    assert inside["whole"] < inside["none"] - 10, inside  # whole-image guidance fights the edit


def test_masked_loss_ignores_inside_and_needs_a_term():
    src = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    region = torch.zeros(1, 1, 8, 8)
    region[..., :4, :] = 1
    loss = masked_perceptual_loss(None, src, region, pixel_weight=1.0)
    changed_inside = src.clone()
    changed_inside[..., :4, :] = 1 - changed_inside[..., :4, :]
    changed_outside = src.clone()
    changed_outside[..., 4:, :] = 1 - changed_outside[..., 4:, :]
    assert loss(changed_inside).item() == pytest.approx(0.0, abs=1e-7)
    assert loss(changed_outside).item() > 0.05
    with pytest.raises(ValueError, match="pixel term"):
        masked_perceptual_loss(None, src, region)


def test_masked_lpips_with_real_trunk(lpips_dir):
    from psedit_core.lpips_loader import get_lpips

    model = get_lpips("vgg", search_dirs=[lpips_dir], spatial=True, allow_download=False)
    g = torch.Generator().manual_seed(1)
    src = torch.rand(1, 3, 64, 64, generator=g)
    region = torch.zeros(1, 1, 64, 64)
    region[..., :, :32] = 1
    loss = masked_perceptual_loss(model, src, region)
    inside, outside = src.clone(), src.clone()
    inside[..., :, :24] = torch.rand(1, 3, 64, 24, generator=g)
    outside[..., :, 40:] = torch.rand(1, 3, 64, 24, generator=g)
    assert loss(outside).item() > 5 * loss(inside).item()
