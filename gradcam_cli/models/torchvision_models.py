"""torchvision classifiers: by name with their DEFAULT weights, the preprocessing of each
architecture, and which architecture a whole model file was built as."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..preprocessing import Preprocessing
from .base import BUILTIN_MODEL, ModelError


def torchvision_classifiers() -> set[str]:
    import torchvision.models
    return set(torchvision.models.list_models(module=torchvision.models))


def torchvision_preprocessing(name: str, model: nn.Module | None = None) -> Preprocessing:
    """The preprocessing of a torchvision model's DEFAULT weights, read from their transforms.

    A model built for one input size (ViT's ``image_size``) gets the transforms of the weights
    made for that size: a vit_h_14 built without weights takes 224 px, not DEFAULT's 518."""
    import torchvision.models
    weights = torchvision.models.get_model_weights(name)
    chosen = weights.DEFAULT
    size = getattr(model, "image_size", None)
    if isinstance(size, int) and chosen.transforms().crop_size[0] != size:
        chosen = next((w for w in weights if w.transforms().crop_size[0] == size), chosen)
    transform = chosen.transforms()
    preprocessing = Preprocessing(resize=transform.resize_size[0], crop=transform.crop_size[0],
                                  mean=tuple(transform.mean), std=tuple(transform.std),
                                  interpolation=transform.interpolation.value)
    if isinstance(size, int) and preprocessing.crop != size:  # no weights of that size
        return preprocessing.with_crop(size)
    return preprocessing


def torchvision_pretrained(name: str) -> tuple[nn.Module, Preprocessing]:
    """A torchvision classifier with DEFAULT weights: from the torch hub cache or downloaded."""
    import torchvision.models
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except Exception as error:  # offline, proxy, disk full: all end the same way for the user
        file_name = weights.url.rsplit("/", 1)[-1]
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        raise ModelError(f"could not get the {name} weights ({type(error).__name__}); put "
                         f"{file_name} in {folder}, or run without --model_path to use the "
                         f"built-in {BUILTIN_MODEL}") from None
    return model, torchvision_preprocessing(name)


def torchvision_arch_of(model: nn.Module) -> str | None:
    """The torchvision classifier name a model was built as, or None.

    The candidates are the names whose builder lives in the module of the model's class
    (``ResNet`` -> resnet18 ... wide_resnet101_2). When their preprocessing differs, the one
    with the same parameter count as the model wins (every DEFAULT weight records it); a model
    with another number of classes is matched on its state_dict's names and shapes instead.
    """
    module = type(model).__module__
    if not module.startswith("torchvision.models."):
        return None  # and no torchvision import (about 2 s) for a model that is not its
    import torchvision.models
    candidates = [name for name in sorted(torchvision_classifiers())
                  if torchvision.models.get_model_builder(name).__module__ == module]
    if not candidates:
        return None
    if len({torchvision_preprocessing(name, model) for name in candidates}) == 1:
        return candidates[0]
    count = sum(p.numel() for p in model.parameters())
    meta = {name: torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]
            for name in candidates}
    same_count = [name for name in candidates if meta[name] == count]
    if len(same_count) == 1:
        return same_count[0]
    signature = _state_signature(model)
    for name in sorted(candidates, key=lambda n: abs(meta[n] - count)):
        if _same_architecture(signature, _state_signature(_build_empty(name))):
            return name
    return None


def _build_empty(name: str) -> nn.Module:
    """The architecture ``name`` without memory for its weights where torch allows it."""
    import torchvision.models
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(name, weights=None)
    except (NotImplementedError, RuntimeError):  # builders that compute on tensors (RegNet)
        return torchvision.models.get_model(name, weights=None)


def _state_signature(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _same_architecture(found: dict[str, tuple[int, ...]],
                       built: dict[str, tuple[int, ...]]) -> bool:
    """Same names and shapes, except classifier rows (1000 in the built one), position
    embeddings, and auxiliary heads that the found model was built without."""
    missing = set(built) - set(found)
    if set(found) - set(built) or any(not key.split(".")[0].lower().startswith("aux")
                                       for key in missing):
        return False
    for key, shape in found.items():
        other = built[key]
        if key.endswith("pos_embedding"):  # its length follows the input size (ViT)
            continue
        if shape != other and not (len(shape) == len(other) and other[0] == 1000
                                   and shape[1:] == other[1:]):
            return False
    return True
