"""State_dict files: weights only, loaded strictly into an architecture.

The architecture is the one ``--arch`` names (a torchvision classifier, ``timm:NAME`` or
efficientnet-lite0), or, for a timm training checkpoint (what timm's train.py writes:
'arch', 'state_dict', 'state_dict_ema', 'args', 'optimizer', ...), the timm architecture the
checkpoint names. The weights come from a ``torch.save`` file (pickled.py reads it without
running code from it) or a ``.safetensors`` file.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..preprocessing import Preprocessing
from .base import BUILTIN_MODEL, LoadedModel, ModelError
from .builtin import BUILTIN_PREPROCESSING, builtin_architecture
from .timm_models import TIMM_PREFIX, build_timm_model, timm_model_preprocessing
from .torchvision_models import torchvision_classifiers, torchvision_preprocessing

_ARCH_HELP = (f"a torchvision classifier name (e.g. resnet50), {TIMM_PREFIX}NAME for a timm "
              f"architecture, or {BUILTIN_MODEL}")
_EMA_KEY = "state_dict_ema"  # where timm's CheckpointSaver puts the EMA model's weights


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


def timm_checkpoint_arch(loaded) -> str | None:
    """The architecture a timm training checkpoint names, or None for anything else.

    timm's CheckpointSaver writes 'arch' (``args.model``), 'state_dict', 'version' and, from
    train.py, 'args' (its argparse.Namespace); other trainers' checkpoints (e.g. PyTorch's
    ImageNet example) also hold an 'arch', of their own naming, but neither of the others."""
    if not (isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping)):
        return None
    args = loaded.get("args")
    if isinstance(args, argparse.Namespace) and isinstance(getattr(args, "model", None), str):
        return args.model
    arch = loaded.get("arch")
    return arch if isinstance(arch, str) and arch and "version" in loaded else None


def from_checkpoint(loaded, arch: str | None, ema: bool, path: Path) -> LoadedModel:
    """A state_dict, or a training checkpoint holding one, loaded into ``arch`` (or, for a
    timm training checkpoint without ``arch``, into the architecture it names)."""
    named = timm_checkpoint_arch(loaded)
    if ema:
        if not (isinstance(loaded, Mapping) and isinstance(loaded.get(_EMA_KEY), Mapping)):
            what = "timm training checkpoint" if named else "file"
            raise ModelError(f"--ema: --model_path {path} holds no EMA weights (this {what} "
                             f"has no '{_EMA_KEY}'); run without --ema to explain its weights")
        state_dict = as_state_dict(loaded[_EMA_KEY])
    else:
        state_dict = as_state_dict(loaded)
    if state_dict is None:
        raise ModelError(f"--model_path {path} holds a {type(loaded).__name__}, neither a "
                         f"model saved with torch.save(model) nor a state_dict")
    if arch is None and named is not None:
        what = f"--model_path {path} (a timm training checkpoint of the timm architecture {named})"
        return LoadedModel(*_timm_model(state_dict, named, what, f"--model_path {path} does not "
                                        f"match the timm architecture {named} it names"))
    if arch is None:
        raise ModelError(f"--model_path {path} holds a state_dict (weights only); add "
                         f"--arch NAME ({_ARCH_HELP}) to say which network they belong to")
    return LoadedModel(*model_from_state_dict(state_dict, arch, str(path)))


def from_safetensors(path: Path, arch: str | None, ema: bool) -> LoadedModel:
    """A state_dict saved with safetensors, loaded strictly into ``arch``."""
    if ema:
        raise ModelError(f"--ema is only for timm training checkpoints (which hold "
                         f"'{_EMA_KEY}'); --model_path {path} is a .safetensors file of one "
                         f"set of weights: run without --ema")
    if arch is None:
        raise ModelError(f"--model_path {path} holds a state_dict (weights only); add "
                         f"--arch NAME ({_ARCH_HELP}) to say which network they belong to")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ModelError(f"--model_path {path} is a .safetensors file, which needs the "
                         f"package safetensors; run: pip install safetensors") from None
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as error:  # safetensors' own SafetensorError, or an OSError
        text = str(error).splitlines()[0] if str(error) else ""
        raise ModelError(f"--model_path {path}: not a readable .safetensors file "
                         f"({type(error).__name__}: {text[:160]})") from None
    state_dict = as_state_dict(tensors)
    if state_dict is None:
        raise ModelError(f"--model_path {path}: the .safetensors file holds no tensors")
    return LoadedModel(*model_from_state_dict(state_dict, arch, str(path)))


def model_from_state_dict(state_dict: Mapping[str, torch.Tensor], arch: str,
                          model_path: str) -> tuple[nn.Module, Preprocessing]:
    """Build ``arch`` with as many outputs as the state_dict's classifier has, then load it."""
    if arch.startswith(TIMM_PREFIX):
        return _timm_model(state_dict, arch[len(TIMM_PREFIX):], f"--arch {arch}",
                           f"--model_path {model_path} does not match --arch {arch}")
    import torchvision.models
    if arch == BUILTIN_MODEL:
        build = builtin_architecture
    elif arch in torchvision_classifiers():
        def build(num_classes: int) -> nn.Module:
            return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    else:
        raise ModelError(f"--arch {arch}: unknown; use {_ARCH_HELP}")
    model = build(num_classes=1000)
    preprocessing = (BUILTIN_PREPROCESSING if arch == BUILTIN_MODEL
                     else torchvision_preprocessing(arch, model))
    last_linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    key = f"{last_linear[-1]}.weight" if last_linear else None
    if key in state_dict and state_dict[key].shape[0] != 1000:
        model = build(num_classes=state_dict[key].shape[0])
    _load_strictly(model, state_dict, f"--model_path {model_path} does not match --arch {arch}")
    return model, preprocessing


def _timm_model(state_dict: Mapping[str, torch.Tensor], name: str, what: str,
                mismatch: str) -> tuple[nn.Module, Preprocessing]:
    """The timm architecture ``name`` holding the state_dict, with timm's preprocessing."""
    model = build_timm_model(name, state_dict, what)
    _load_strictly(model, state_dict, mismatch)
    return model, timm_model_preprocessing(model, what)


def _load_strictly(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                   mismatch: str) -> None:
    """``model.load_state_dict(state_dict)`` (strict), or a ModelError that starts with
    ``mismatch`` and sums up the keys that differ."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        detail = mismatch_summary(model.state_dict(), state_dict) or " ".join(
            str(error).split())[:300]
        raise ModelError(f"{mismatch}: {detail}") from None


def mismatch_summary(expected: Mapping[str, torch.Tensor],
                     found: Mapping[str, torch.Tensor]) -> str:
    """Which keys the architecture expects and the file lacks, which the file has and the
    architecture does not, and which differ in shape: counts and the first few of each."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [k for k in expected if k in found
                and tuple(found[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} keys missing from the file ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys in it ({_first(unexpected)})")
    if reshaped:
        key = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape ({key}: "
                     f"{'x'.join(map(str, found[key].shape))} in the file, "
                     f"{'x'.join(map(str, expected[key].shape))} in the architecture"
                     f"{', ...' if len(reshaped) > 1 else ''})")
    return "; ".join(parts)


def _first(keys: list[str], count: int = 3) -> str:
    return ", ".join(keys[:count]) + (", ..." if len(keys) > count else "")
