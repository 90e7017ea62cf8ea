import subprocess
import sys
import urllib.error

import pytest
import torch

from psedit_core import lpips_loader
from psedit_core.lpips_loader import LPIPSWeightsNotFoundError, get_lpips, load_trunk_state_dict


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A torch hub cache with nothing in it, so no file a user happens to have is found."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def test_loads_real_trunk_frozen_fp32_and_cached(lpips_dir, empty_hub):
    model = get_lpips("alex", search_dirs=[lpips_dir], allow_download=False)
    features = load_trunk_state_dict(lpips_dir / "alexnet_features.pth")
    assert torch.equal(getattr(model.net.slice1, "0").weight, features["features.0.weight"].float())
    assert torch.equal(getattr(model.net.slice5, "10").bias, features["features.10.bias"].float())
    params = list(model.parameters())
    assert params and all(p.dtype == torch.float32 and not p.requires_grad for p in params)
    assert not model.training
    assert get_lpips("alex", search_dirs=[lpips_dir], allow_download=False) is model


def test_accepts_full_torchvision_checkpoint(lpips_dir, tmp_path, empty_hub):
    features = load_trunk_state_dict(lpips_dir / "squeezenet1_1_features.pth")
    full = dict(features)
    full["classifier.1.weight"] = torch.zeros(1000, 512, 1, 1)
    full["classifier.1.bias"] = torch.zeros(1000)
    folder = tmp_path / "models_lpips"
    folder.mkdir()
    torch.save(full, folder / "squeezenet1_1-b8a52dc0.pth")
    model = get_lpips("squeeze", search_dirs=[folder], allow_download=False)
    assert torch.equal(getattr(model.net.slice2, "3").squeeze.weight, features["features.3.squeeze.weight"])
    # The same checkpoint is found in the torch hub cache, where torchvision keeps its downloads.
    (empty_hub / "checkpoints").mkdir(parents=True)
    torch.save(full, empty_hub / "checkpoints" / "squeezenet1_1-b8a52dc0.pth")
    assert lpips_loader.find_trunk_file("squeeze") == empty_hub / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"


def test_explicit_file_and_bad_files(lpips_dir, tmp_path):
    model = get_lpips("vgg", trunk_path=lpips_dir / "vgg16_features.pth")
    assert model.net.slice1[0].weight.shape == (64, 3, 3, 3)
    with pytest.raises(LPIPSWeightsNotFoundError, match="does not exist"):
        get_lpips("vgg", trunk_path=tmp_path / "nope.pth")
    torch.save({"classifier.0.weight": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="features"):
        get_lpips("vgg", trunk_path=tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not match"):
        get_lpips("vgg", trunk_path=lpips_dir / "alexnet_features.pth")
    with pytest.raises(ValueError, match="unknown LPIPS net"):
        get_lpips("resnet")


def test_offline_error_names_file_and_folders(tmp_path, empty_hub):
    with pytest.raises(LPIPSWeightsNotFoundError) as info:
        get_lpips("alex", search_dirs=[tmp_path / "models" / "lpips"], allow_download=False)
    msg = str(info.value)
    assert "alexnet-owt-7be5be79.pth" in msg and str(tmp_path / "models" / "lpips") in msg
    assert str(empty_hub / "checkpoints") in msg


def test_failed_download_becomes_named_error(tmp_path, empty_hub, monkeypatch):
    import lpips

    def offline(*args, pnet_rand=False, **kwargs):
        assert not pnet_rand, "download path must ask torchvision for pretrained weights"
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(lpips, "LPIPS", offline)
    with pytest.raises(LPIPSWeightsNotFoundError, match="download failed.*vgg16-397923af.pth"):
        get_lpips("vgg", search_dirs=[tmp_path], allow_download=True)


def test_nothing_built_or_imported_at_import():
    code = (
        "import sys, psedit_core, psedit_core.lpips_loader, psedit_core.metrics, psedit_core.perceptual;"
        "assert 'lpips' not in sys.modules, 'lpips imported at import time';"
        "assert 'torchvision' not in sys.modules, 'torchvision imported at import time'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
