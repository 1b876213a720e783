"""Loading the model to explain, in each form ``--model_path`` accepts, with its preprocessing.

Forms, one module each:
  * nothing or ``efficientnet-lite0``: the built-in ImageNet classifier, offline (builtin.py);
  * a torchvision model name (``vgg16``, ``resnet50``, ...): torchvision's DEFAULT weights
    (torchvision_models.py);
  * a file written by ``torch.save(model)`` (pickled.py): a whole torchvision model gets its
    architecture's own preprocessing, a whole timm model its data config's (timm_models.py);
  * a state_dict file (torch.save or .safetensors) together with ``arch``, or a timm training
    checkpoint, which names its own architecture (state_dicts.py, timm_models.py);
  * a Hugging Face model folder (save_pretrained) or ``hf:ORG/NAME`` in the local cache
    (huggingface.py).

Every user mistake raises ``ModelError`` with a one-line message that says what to do.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

from ..preprocessing import IMAGENET_PREPROCESSING, Preprocessing
from . import state_dicts
from .base import BUILTIN_MODEL, LoadedModel, ModelError, SizeError
from .builtin import BUILTIN_PREPROCESSING, builtin_model
from .pickled import load_file
from .timm_models import is_timm_model, timm_model_preprocessing
from .torchvision_models import (
    torchvision_arch_of,
    torchvision_classifiers,
    torchvision_preprocessing,
    torchvision_pretrained,
)

HUB_PREFIX = "hf:"  # --model_path hf:ORG/NAME: a model in the local Hugging Face cache

__all__ = ["load_model", "LoadedModel", "ModelError", "SizeError", "BUILTIN_MODEL",
           "BUILTIN_PREPROCESSING", "whole_model_preprocessing", "torchvision_arch_of"]


def load_model(model_path: str | None, arch: str | None = None, trust_model: bool = False,
               ema: bool = False) -> LoadedModel:
    """The model named by ``--model_path`` (and ``--arch``, ``--ema``) with the preprocessing
    it expects, and the labels and head its own files describe."""
    path = Path(model_path) if model_path is not None else None
    if ema and (path is None or not path.is_file() or path.suffix == ".safetensors"):
        raise ModelError(f"--ema is only for timm training checkpoints (a file with "
                         f"state_dict_ema); "
                         f"{'--model_path ' + model_path if model_path else 'the built-in model'}"
                         f" is not one")
    if model_path is None or model_path == BUILTIN_MODEL:
        if arch is not None:
            raise ModelError("--arch is only for a state_dict file given with --model_path")
        return LoadedModel(builtin_model(), BUILTIN_PREPROCESSING)
    if model_path.startswith(HUB_PREFIX):
        from . import huggingface
        return huggingface.load_from_cache(model_path[len(HUB_PREFIX):], trust_model)
    if not path.exists():
        if arch is None and model_path in torchvision_classifiers():
            return LoadedModel(*torchvision_pretrained(model_path))
        if path.suffix or "/" in model_path or "\\" in model_path:
            raise ModelError(f"--model_path {model_path}: no such file; give the path of a "
                             f"torch.save() file, a Hugging Face model folder, a torchvision "
                             f"model name or {BUILTIN_MODEL}")
        raise ModelError(f"--model_path {model_path}: not a file, a torchvision classifier name "
                         f"(e.g. resnet50, vgg16), hf:ORG/NAME or {BUILTIN_MODEL}")
    if path.is_dir():
        from . import huggingface
        return huggingface.load_folder(path, trust_model)
    if path.suffix == ".safetensors":
        return state_dicts.from_safetensors(path, arch, ema)
    loaded = load_file(path, trust_model)
    if isinstance(loaded, nn.Module):
        if ema:
            raise ModelError(f"--ema is only for timm training checkpoints (a file with "
                             f"state_dict_ema); --model_path {model_path} holds a whole model")
        if arch is not None:
            print(f"warning: --arch {arch} ignored: {model_path} holds a whole model",
                  file=sys.stderr)
        return LoadedModel(loaded, whole_model_preprocessing(loaded))
    return state_dicts.from_checkpoint(loaded, arch, ema, path)


def whole_model_preprocessing(model: nn.Module) -> Preprocessing:
    """The preprocessing a whole model file gets: a torchvision classifier's architecture's own
    (its DEFAULT weights' transforms), a timm model's data config as timm resolves and applies
    it (unpickling a timm model imports timm, so it is there), else ImageNet's."""
    arch = torchvision_arch_of(model)
    if arch is not None:
        return torchvision_preprocessing(arch, model)
    if is_timm_model(model):
        return timm_model_preprocessing(model, f"the timm model {type(model).__name__}")
    size = getattr(model, "image_size", None)  # a ViT of another size: crop to that size
    if isinstance(size, int) and size != IMAGENET_PREPROCESSING.crop:
        return IMAGENET_PREPROCESSING.with_crop(size)
    return IMAGENET_PREPROCESSING
