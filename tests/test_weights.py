"""Offline encoder weights: the Lite0 import is real ImageNet, and every spec loads or fails clearly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from huggingface_hub import constants
from PIL import Image
from safetensors.torch import load_file, save_file
from skimage.data import chelsea

from ptxlab.weights import REGISTERED, WeightsError, apply_encoder_weights, import_lite0

LITE0 = "tu-tf_efficientnet_lite0"
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat


@pytest.fixture(scope="module")
def lite0_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PTXLAB_CACHE holding the converted weights (converted once per module)."""
    home = tmp_path_factory.mktemp("ptxlab_home")
    import_lite0(home / "weights")
    return home


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network, an empty hub cache and an empty PTXLAB_CACHE; returns the hub cache dir."""
    cache = tmp_path / "hf_hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("PTXLAB_CACHE", str(tmp_path / "empty_home"))
    monkeypatch.setenv("HOME", str(tmp_path))
    return cache


def _lite0_file(home: Path) -> Path:
    return home / "weights" / REGISTERED["lite0-imagenet"].filename


def _unet(encoder: str = LITE0) -> torch.nn.Module:
    torch.manual_seed(0)
    return smp.Unet(encoder, encoder_weights=None).eval()


def _assert_encoder_holds(model: torch.nn.Module, timm_state: dict[str, torch.Tensor]) -> None:
    encoder_state = model.encoder.state_dict()
    for key, tensor in encoder_state.items():
        torch.testing.assert_close(tensor, timm_state[key.removeprefix("model.")], msg=key)


@pytest.mark.slow
def test_converted_lite0_classifies_a_cat(lite0_home: Path) -> None:
    network = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    network.load_state_dict(load_file(_lite0_file(lite0_home)), strict=True)
    config = timm.data.resolve_data_config({}, model=network)
    assert config["mean"] == (0.5, 0.5, 0.5) and config["input_size"] == (3, 224, 224)
    batch = timm.data.create_transform(**config)(Image.fromarray(chelsea()))[None]
    with torch.no_grad():
        probabilities = network(batch).softmax(dim=-1)[0]
    assert int(probabilities.argmax()) in CAT_CLASSES
    assert float(probabilities[list(CAT_CLASSES)].sum()) > 0.5


@pytest.mark.slow
def test_registered_name_loads_every_encoder_tensor(
    lite0_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PTXLAB_CACHE", str(lite0_home))
    model = _unet()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    note = apply_encoder_weights(model, LITE0, "lite0-imagenet")
    assert str(_lite0_file(lite0_home)) in note
    _assert_encoder_holds(model, load_file(_lite0_file(lite0_home)))
    with torch.no_grad():
        assert not torch.allclose(model(x), before, atol=1e-3)


@pytest.mark.slow
def test_registered_name_needs_its_encoder_and_is_converted_on_first_use(offline: Path) -> None:
    with pytest.raises(WeightsError, match="holds tu-tf_efficientnet_lite0 weights"):
        apply_encoder_weights(_unet("tu-resnet18"), "tu-resnet18", "lite0-imagenet")
    converted = offline.parent / "empty_home" / "weights" / "tf_efficientnet_lite0.imagenet.safetensors"
    assert not converted.exists()
    note = apply_encoder_weights(_unet(), LITE0, "lite0-imagenet")
    assert converted.is_file() and str(converted) in note


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["encoder.pt", "smp_model.pth", "encoder.safetensors"])
def test_local_state_dict_files_load(lite0_home: Path, tmp_path: Path, layout: str) -> None:
    source = _unet()
    apply_encoder_weights(source, LITE0, str(_lite0_file(lite0_home)))
    path = tmp_path / layout
    if layout == "encoder.pt":
        torch.save(source.encoder.state_dict(), path)
    elif layout == "smp_model.pth":
        torch.save(source.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, path)
    model = _unet()
    assert apply_encoder_weights(model, LITE0, str(path)) == f"file {path}"
    _assert_encoder_holds(model, load_file(_lite0_file(lite0_home)))


@pytest.mark.slow
def test_imagenet_prefers_the_hub_cache(lite0_home: Path, offline: Path) -> None:
    """A hub-cache entry (laid out as huggingface_hub stores it) is used without the network."""
    repo = offline / "models--timm--tf_efficientnet_lite0.in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / "model.safetensors").write_bytes(_lite0_file(lite0_home).read_bytes())
    model = _unet()
    note = apply_encoder_weights(model, LITE0, "imagenet")
    assert note.startswith("imagenet (hub cache:")
    _assert_encoder_holds(model, load_file(_lite0_file(lite0_home)))


@pytest.mark.slow
def test_imagenet_falls_back_to_the_imported_lite0(
    lite0_home: Path, offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PTXLAB_CACHE", str(lite0_home))
    model = _unet()
    assert apply_encoder_weights(model, LITE0, "imagenet").startswith(
        "imagenet (imported lite0-imagenet:"
    )
    _assert_encoder_holds(model, load_file(_lite0_file(lite0_home)))


@pytest.mark.parametrize("encoder", [LITE0, "efficientnet-b4"])
@pytest.mark.parametrize("hub", ["HF_HUB_OFFLINE", "unreachable endpoint"])
def test_imagenet_without_cache_fails_fast_and_clearly(
    offline: Path, monkeypatch: pytest.MonkeyPatch, encoder: str, hub: str
) -> None:
    if hub == "unreachable endpoint":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    model = _unet(encoder)
    start = time.monotonic()
    with pytest.raises(WeightsError) as caught:
        apply_encoder_weights(model, encoder, "imagenet")
    assert time.monotonic() - start < 5
    message = str(caught.value)
    assert "\n" not in message
    assert "ptxlab weights import-lite0" in message
    assert "model.encoder_weights=/path/to/encoder.safetensors" in message


def test_wrong_or_broken_files_give_one_line_naming_the_file(
    lite0_home: Path, tmp_path: Path
) -> None:
    wrong = _lite0_file(lite0_home)
    with pytest.raises(WeightsError) as caught:
        apply_encoder_weights(_unet("efficientnet-b4"), "efficientnet-b4", str(wrong))
    message = str(caught.value)
    assert message.startswith(f"{wrong}: does not fit encoder efficientnet-b4; missing: ")
    assert "unexpected: " in message and "\n" not in message

    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=rf"^{broken}: cannot read weights \([^\n]*\)$"):
        apply_encoder_weights(_unet(), LITE0, str(broken))

    with pytest.raises(WeightsError, match="no such weights file"):
        apply_encoder_weights(_unet(), LITE0, str(tmp_path / "absent.safetensors"))


def test_none_keeps_random_init() -> None:
    model = _unet()
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    assert apply_encoder_weights(model, LITE0, None) == "random init"
    for key, tensor in model.encoder.state_dict().items():
        assert torch.equal(tensor, before[key])
