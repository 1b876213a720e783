"""timm models: a timm architecture built for a state_dict (``--arch timm:NAME`` or the
architecture a timm training checkpoint names), and the preprocessing timm's own data config
gives a timm model, mapped exactly as timm's evaluation transform applies it.

timm is imported only here, and only when a timm architecture or a whole timm model is met:
starting with a torchvision or the built-in model never imports it.
"""

from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Mapping

import torch
from torch import nn

from ..preprocessing import Preprocessing
from .base import ModelError

TIMM_PREFIX = "timm:"  # --arch timm:NAME: a timm architecture
_DEFAULT_CROP_PCT = 0.875  # timm.data.DEFAULT_CROP_PCT, what timm uses when a config has none
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def import_timm(what: str):
    """timm, or a ModelError saying that ``what`` needs it."""
    try:
        import timm
        import timm.data  # noqa: F401  (the data config resolver, used below)
    except ImportError:
        raise ModelError(f"{what} needs the package timm, which is not installed; run: "
                         f"pip install timm") from None
    return timm


def build_timm_model(name: str, state_dict: Mapping[str, torch.Tensor],
                     what: str) -> nn.Module:
    """``timm.create_model(name, pretrained=False)`` with as many outputs as the state_dict's
    classifier has. ``what`` says where the name comes from, for the messages
    (``--arch timm:resnet18``, or the checkpoint that names it)."""
    timm = import_timm(what)
    if not _known(timm, name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = (f"did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close
                else "timm.list_models() lists them")
        if not what.startswith("--arch"):  # named by the file: say how to name another
            hint += " (give the architecture with --arch timm:NAME)"
        raise ModelError(f"{what}: timm {timm.__version__} has no architecture {name!r}; {hint}")
    rows = _classifier_rows(timm, name, state_dict)
    model = _create(timm, name, rows, what)
    if rows is None:  # no classifier name in timm's config: ask the built model for its head
        rows = _rows_of_head(model, state_dict)
        if rows is not None:
            model = _create(timm, name, rows, what)
    return model


def _known(timm, name: str) -> bool:
    """An architecture timm can build, also with a pretrained tag (``resnet18.a1_in1k``,
    whose tag picks the data config)."""
    try:
        return bool(timm.is_model(name))
    except Exception:  # a malformed name (e.g. an hf-hub: id) is simply not one
        return False


def _create(timm, name: str, num_classes: int | None, what: str) -> nn.Module:
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as error:  # an unknown pretrained tag, a model that needs arguments
        text = str(error).splitlines()[0] if str(error) else ""
        raise ModelError(f"{what}: timm could not build {name} "
                         f"({type(error).__name__}: {text})") from None


def _classifier_rows(timm, name: str, state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The number of classes of the state_dict's classifier, found by the classifier's name
    in timm's config for ``name`` (``fc``, ``head``, ``head.fc``, ...)."""
    try:
        classifier = timm.models.get_pretrained_cfg_value(name, "classifier")
    except Exception:
        return None
    if isinstance(classifier, (tuple, list)):  # distilled models: (head, head_dist)
        classifier = classifier[0] if classifier else None
    weight = state_dict.get(f"{classifier}.weight") if isinstance(classifier, str) else None
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() else None


def _rows_of_head(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The state_dict's rows for the module ``model.get_classifier()`` returns, where they
    differ from the built model's."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    for name, module in model.named_modules():
        if module is head and name:
            weight = state_dict.get(f"{name}.weight")
            built = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() and isinstance(
                    built, torch.Tensor) and weight.shape[0] != built.shape[0]:
                return int(weight.shape[0])
    return None


def timm_model_preprocessing(model: nn.Module, what: str) -> Preprocessing:
    """The evaluation preprocessing timm resolves for ``model``: its data config
    (``timm.data.resolve_data_config({}, model=model)``, i.e. its pretrained_cfg with timm's
    defaults filled in), mapped as timm's ``create_transform(**config)`` applies it."""
    timm = import_timm(what)
    config = timm.data.resolve_data_config({}, model=model)
    return preprocessing_from_data_config(config, what)


def preprocessing_from_data_config(config: Mapping, what: str) -> Preprocessing:
    """timm's evaluation transform (``transforms_imagenet_eval``) as a ``Preprocessing``.

    timm computes ``scale_size = floor(img_size / crop_pct)``, then for ``crop_mode``
    'center' (the default) resizes the shorter side to it (torchvision ``Resize(int)``), for
    'squash' both sides (``Resize((s, s))``), and centre-crops ``img_size`` with torchvision's
    ``CenterCrop``; then ToTensor and Normalize(mean, std). Those map one to one, so the crop
    and the input equal timm's. Two cases timm handles that a ``Preprocessing`` cannot hold
    are approximated, with a warning: 'border' (resize the longer side and pad to a square
    with the mean colour: here the shorter side is resized and the centre cropped, so the
    edges are cut instead of padded), and ``crop_pct`` above 1 (CenterCrop pads the too-small
    image with black: here it is resized up to the crop). Both occur in a handful of timm's
    configs only (none of them ImageNet classifiers' in timm 1.0)."""
    size = tuple(int(v) for v in config["input_size"])
    channels, height, width = size if len(size) == 3 else (3, *size[-2:])
    if channels != 3 or len(config["mean"]) != 3 or len(config["std"]) != 3:
        raise ModelError(f"{what}: the model takes {channels}-channel images; this tool feeds "
                         f"RGB images (3 channels)")
    if height != width:
        raise ModelError(f"{what}: the model takes {height}x{width} inputs; this tool crops "
                         f"square images only")
    interpolation = str(config.get("interpolation") or "bilinear")
    if interpolation not in _INTERPOLATIONS:  # 'random' is for training only
        _warn(f"{what}: timm's interpolation {interpolation!r} has no fixed evaluation "
              f"meaning; using bicubic")
        interpolation = "bicubic"
    crop_pct = float(config.get("crop_pct") or _DEFAULT_CROP_PCT)
    scale = math.floor(height / crop_pct)
    mode = config.get("crop_mode") or "center"
    if mode == "border":
        _warn(f"{what}: timm's crop_mode 'border' (resize the longer side, pad to a square) is "
              f"approximated by 'center' (resize the shorter side, crop the centre)")
    elif mode not in ("center", "squash"):
        raise ModelError(f"{what}: timm's crop_mode {mode!r} is unknown to this tool; it maps "
                         f"'center', 'squash' and 'border'")
    if scale < height:
        _warn(f"{what}: crop_pct {crop_pct} > 1: timm pads the resized image with black to "
              f"{height} px; here it is resized to {height} px instead")
        scale = height
    return Preprocessing(resize=scale, crop=height, mean=tuple(float(v) for v in config["mean"]),
                         std=tuple(float(v) for v in config["std"]),
                         interpolation=interpolation, squash=mode == "squash")


def is_timm_model(model: nn.Module) -> bool:
    """A model built by timm: a timm class (or a subclass of one) with its pretrained_cfg.
    Only asked where timm is already imported (unpickling a timm model imports it)."""
    if sys.modules.get("timm") is None or not isinstance(
            getattr(model, "pretrained_cfg", None), Mapping):
        return False
    return any(klass.__module__.startswith("timm.") for klass in type(model).__mro__)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
