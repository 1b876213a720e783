"""State_dict files: weights only, loaded strictly into the architecture ``--arch`` names."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..preprocessing import Preprocessing
from .base import BUILTIN_MODEL, LoadedModel, ModelError
from .builtin import BUILTIN_PREPROCESSING, builtin_architecture
from .torchvision_models import torchvision_classifiers, torchvision_preprocessing


def as_state_dict(loaded) -> Mapping[str, torch.Tensor] | None:
    """The tensors of a state_dict, also inside a {'state_dict': ...} training checkpoint."""
    if not isinstance(loaded, Mapping):
        return None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return None
    prefix = "module."  # saved from DataParallel / DistributedDataParallel
    if all(k.startswith(prefix) for k in loaded):
        loaded = {k[len(prefix):]: v for k, v in loaded.items()}
    return loaded


def from_checkpoint(loaded, arch: str | None, ema: bool, path: Path) -> LoadedModel:
    """A state_dict, or a training checkpoint holding one, loaded into ``arch``."""
    state_dict = as_state_dict(loaded)
    if state_dict is None:
        raise ModelError(f"--model_path {path} holds a {type(loaded).__name__}, neither a "
                         f"model saved with torch.save(model) nor a state_dict")
    if arch is None:
        raise ModelError(f"--model_path {path} holds a state_dict (weights only); add "
                         f"--arch NAME (a torchvision model name or {BUILTIN_MODEL}) to say "
                         f"which network they belong to")
    return LoadedModel(*model_from_state_dict(state_dict, arch, str(path)))


def from_safetensors(path: Path, arch: str | None, ema: bool) -> LoadedModel:
    raise ModelError(f"--model_path {path}: .safetensors files are not supported yet")


def model_from_state_dict(state_dict: Mapping[str, torch.Tensor], arch: str,
                          model_path: str) -> tuple[nn.Module, Preprocessing]:
    """Build ``arch`` with as many outputs as the state_dict's classifier has, then load it."""
    import torchvision.models
    if arch == BUILTIN_MODEL:
        build = builtin_architecture
    elif arch in torchvision_classifiers():
        def build(num_classes: int) -> nn.Module:
            return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    else:
        raise ModelError(f"--arch {arch}: unknown; use a torchvision classifier name "
                         f"(e.g. resnet50) or {BUILTIN_MODEL}")
    model = build(num_classes=1000)
    preprocessing = (BUILTIN_PREPROCESSING if arch == BUILTIN_MODEL
                     else torchvision_preprocessing(arch, model))
    last_linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    key = f"{last_linear[-1]}.weight" if last_linear else None
    if key in state_dict and state_dict[key].shape[0] != 1000:
        model = build(num_classes=state_dict[key].shape[0])
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise ModelError(f"--model_path {model_path} does not match --arch {arch}: "
                         f"{detail}") from None
    return model, preprocessing
