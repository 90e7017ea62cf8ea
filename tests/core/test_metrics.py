import math

import pytest
import torch

from psedit_core.lpips_loader import get_lpips
from psedit_core.metrics import clip_directional_similarity, clip_score, lpips_distance, psnr


def test_psnr_of_known_noise():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 16, 16, generator=g) * 0.8 + 0.1
    signs = torch.randint(0, 2, a.shape, generator=g) * 2 - 1
    b = a + 0.1 * signs  # every pixel off by exactly 0.1: MSE = 0.01 -> PSNR = 20 dB
    assert psnr(a, b).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    assert psnr(a, a + 0.01 * signs).tolist() == pytest.approx([40.0, 40.0], abs=1e-3)
    assert psnr(a * 255, b * 255, data_range=255.0).tolist() == pytest.approx([20.0, 20.0], abs=1e-3)
    assert math.isinf(psnr(a, a)[0].item())
    with pytest.raises(ValueError, match="shape"):
        psnr(a, a[:, :, :8])


def test_clip_score_by_hand():
    e_i = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    e_t = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [3.0, 0.0]])
    # cos 45 deg -> 70.71; opposite -> clamped to 0; parallel, unnormalised -> 100.
    assert clip_score(e_i, e_t).tolist() == pytest.approx([100 / math.sqrt(2), 0.0, 100.0], abs=1e-4)


def test_clip_score_with_embedding_functions():
    table = {"a cat": [0.0, 1.0], "a dog": [1.0, 0.0]}
    embed_text = lambda ts: torch.tensor([table[t] for t in ts])
    score = clip_score(torch.tensor([[1.0, 1.0]]), ["a cat"], embed_text=embed_text)
    assert score.item() == pytest.approx(100 / math.sqrt(2), abs=1e-4)


def test_clip_directional_similarity_by_hand():
    src_i, edit_i = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])  # dI = (0, 1, 0)
    src_t, edit_t = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.0, 1.0, 2.0]])  # dT = (0, 1, 1)
    assert clip_directional_similarity(src_i, edit_i, src_t, edit_t).item() == pytest.approx(1 / math.sqrt(2))
    assert clip_directional_similarity(src_i, edit_i, edit_t, src_t).item() == pytest.approx(-1 / math.sqrt(2))


def test_lpips_distance_zero_on_identity(lpips_dir):
    model = get_lpips("alex", search_dirs=[lpips_dir], allow_download=False)
    img = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    d = lpips_distance(model, img, img)
    assert d.shape == (2,) and d.abs().max() < 1e-6
    assert (lpips_distance(model, img, img.flip(-1)) > 0.05).all()
