"""Hugging Face image classifiers: a save_pretrained folder, or hf:ORG/NAME in the local
cache, loaded offline with the preprocessing and labels the folder describes.

Nothing here reaches the network: ``HF_HUB_OFFLINE=1`` is set before transformers is imported
(unless the user set it) and every load passes ``local_files_only=True``. transformers is
imported only here, when such a model is asked for, so other runs never pay for its import.

The folder's image processor (preprocessor_config.json) becomes a ``Preprocessing`` by reading
its attributes (``processor_preprocessing``): resize, centre crop, resampling filter, rescale
and normalization, a channel flip. What cannot be expressed exactly is refused in one line
that names the attribute, never approximated. The reading is then checked on two test images
against the processor's PIL backend (the same PIL resize as this tool's: equal to float
rounding), or, for a processor without one, against the processor itself (within one pixel
level): a processor class whose code does more than its attributes say is refused too.

transformers 5's AutoImageProcessor gives the torchvision backend by default. Its antialiased
resize rounds some pixels to the neighbouring 8-bit level (under 1% of the values on photos
that it shrinks), so this tool's input equals the PIL backend's and is within one level of
the torchvision backend's; with NEAREST, torchvision's nearest-exact also picks other source
pixels for some scales, where the two backends disagree with each other.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..preprocessing import IMAGENET_PREPROCESSING, Preprocessing
from .base import LoadedModel, ModelError, SizeError

__all__ = ["load_folder", "load_from_cache", "processor_preprocessing", "labels_of",
           "hub_cache_dir", "SizeError"]

CONFIG = "config.json"
PROCESSOR_CONFIG = "preprocessor_config.json"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
           "pytorch_model.bin.index.json")
INSTALL = "pip install transformers"

# PIL's resampling filters by number (transformers' PILImageResampling), and torchvision's
# InterpolationMode values, as this tool's interpolation names. torchvision's "nearest" is
# not PIL's nearest (its sampling points are shifted), so it has no name here.
_PIL_RESAMPLING = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box",
                   5: "hamming"}
_TORCHVISION_MODES = {"nearest-exact": "nearest", "bilinear": "bilinear", "bicubic": "bicubic",
                      "lanczos": "lanczos", "box": "box", "hamming": "hamming"}
# Image processor settings that change nothing in the pixel values of an RGB image, or that
# the reading below handles.
_HANDLED = {"do_convert_rgb", "do_resize", "size", "default_to_square", "crop_size", "resample",
            "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
            "do_pad", "pad_size", "do_center_crop", "data_format", "input_data_format",
            "device", "return_tensors", "disable_grouping", "image_seq_length", "crop_pct",
            "rescale_offset", "include_top", "do_flip_channel_order", "do_reduce_labels"}
# The largest difference allowed between this tool's model input and the processor's, in
# levels of the 8-bit pixels (a difference in the input divided by what one level is worth):
# against a PIL backend, float rounding only; against a torchvision backend, whose antialiased
# resize rounds some pixels to the next level, one level.
PIL_TOLERANCE_LEVELS = 0.01
TORCHVISION_TOLERANCE_LEVELS = 1.01
_CONVNEXT_WARP_SIZE = 384  # ConvNeXt's processor squashes at this shortest_edge and above


# ----------------------------------------------------------------------------- loading

def load_folder(path: Path, trust_model: bool, shown: str | None = None) -> LoadedModel:
    """A folder written by ``save_pretrained`` (config.json, the weights, the image
    processor's preprocessor_config.json). ``shown``: how messages name the model (the
    ``hf:ORG/NAME`` the user gave), else ``--model_path PATH``."""
    path = Path(path)
    where = shown or f"--model_path {path}"
    config_file = path / CONFIG
    if not config_file.is_file():
        if shown:
            raise ModelError(f"{where}: its copy in the Hugging Face cache ({path}) has no "
                             f"{CONFIG}; download it again, then run again")
        raise ModelError(f"{where} is a folder but not a Hugging Face model folder (no "
                         f"{CONFIG}); give the model file inside it")
    config_json = _read_json(config_file, where)
    if "auto_map" in config_json and not trust_model:
        raise ModelError(f"{where}: the model in this folder runs its own code from the folder "
                         f"(auto_map in {CONFIG}); add --trust_model if you trust it")
    if not any((path / name).is_file() for name in WEIGHTS):
        raise ModelError(f"{where}: no model.safetensors in the folder (the weights "
                         f"save_pretrained writes); copy the whole model folder")
    processor_file = path / PROCESSOR_CONFIG
    if processor_file.is_file() and "auto_map" in _read_json(processor_file, where) \
            and not trust_model:
        raise ModelError(f"{where}: the image processor in this folder runs its own code from "
                         f"the folder (auto_map in {PROCESSOR_CONFIG}); add --trust_model if "
                         f"you trust it")
    transformers = _import_transformers(where)
    with _quiet(transformers):
        model = _load_classifier(transformers, path, trust_model, where)
        model.eval()
        labels = labels_of(model.config)
        multi_label = getattr(model.config, "problem_type", None) == "multi_label_classification"
        if processor_file.is_file():
            processor = _load_processor(transformers, path, trust_model, where)
            try:
                preprocessing = processor_preprocessing(
                    processor, f"{where}: {PROCESSOR_CONFIG}",
                    _pil_twin(transformers, processor, path))
            except SizeError as error:
                error.loaded = LoadedModel(model, error.partial, labels, multi_label)
                raise
        else:
            preprocessing = _fallback_preprocessing(model.config, where)
    return LoadedModel(model, preprocessing, labels, multi_label)


def load_from_cache(repo_id: str, trust_model: bool) -> LoadedModel:
    """``hf:ORG/NAME``: the model of that hub id, from the local Hugging Face cache."""
    where = f"--model_path hf:{repo_id}"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub
    except ImportError:
        raise ModelError(f"{where}: Hugging Face models need the transformers package; "
                         f"{INSTALL}") from None
    cache = hub_cache_dir()
    try:
        folder = huggingface_hub.snapshot_download(repo_id, cache_dir=str(cache),
                                                   local_files_only=True)
    except Exception as error:
        if type(error).__name__ == "HFValidationError" or not repo_id.strip("/"):
            raise ModelError(f"{where}: not a Hugging Face hub id; give hf:ORG/NAME") from None
        raise ModelError(f"{where}: not in the local Hugging Face cache ({cache}); download it "
                         f"with `hf download {repo_id}` (or `huggingface-cli download "
                         f"{repo_id}`), then run again") from None
    return load_folder(Path(folder), trust_model, shown=where)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read from the environment now (as huggingface_hub
    reads it at its import): HF_HUB_CACHE, else HF_HOME/hub, else
    XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        home = os.path.join(base, "huggingface")
    return Path(home).expanduser() / "hub"


def labels_of(config) -> list[str] | None:
    """The class names of ``config.id2label`` in index order; None when it holds none (empty,
    with gaps, or transformers' placeholders LABEL_0, LABEL_1, ...)."""
    id2label = getattr(config, "id2label", None) or {}
    try:
        by_index = {int(key): str(name) for key, name in id2label.items()}
        names = [by_index[i] for i in range(len(by_index))]
    except (KeyError, TypeError, ValueError):
        return None
    if not names or all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return None
    return names


def _read_json(file: Path, where: str) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{where}: cannot read {file.name} ({error}); copy the model folder "
                         f"again") from None
    if not isinstance(data, dict):
        raise ModelError(f"{where}: {file.name} is not a JSON object; copy the model folder "
                         f"again")
    return data


def _import_transformers(where: str):
    """transformers, imported offline: HF_HUB_OFFLINE=1 unless the user set it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ModelError(f"{where}: Hugging Face models need the transformers package; "
                         f"{INSTALL}") from None
    except Exception as error:
        raise ModelError(f"{where}: transformers fails to import ({type(error).__name__}: "
                         f"{_one_line(error)}); reinstall it: {INSTALL}") from None
    return transformers


@contextlib.contextmanager
def _quiet(transformers):
    """No progress bars, info lines or warnings from transformers while loading: the tool's
    stderr is its own; what matters is turned into a ModelError."""
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _load_classifier(transformers, path: Path, trust_model: bool, where: str):
    """AutoModelForImageClassification from the folder; refuses a model type transformers
    does not know, one that is no image classifier, and weights without its head."""
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True,
                                                         trust_remote_code=trust_model)
    except Exception as error:
        raise ModelError(f"{where}: transformers {transformers.__version__} cannot read its "
                         f"{CONFIG} ({_one_line(error)}); a newer transformers may know this "
                         f"model: pip install -U transformers") from None
    mapping = getattr(transformers, "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING", None)
    remote = "AutoModelForImageClassification" in (getattr(config, "auto_map", None) or {})
    if mapping is not None and not remote and type(config) not in mapping:
        kind = getattr(config, "model_type", type(config).__name__)
        raise ModelError(f"{where}: a {kind} model is not an image classifier "
                         f"(AutoModelForImageClassification has no class for it); give a "
                         f"folder saved from an image classification model")
    try:
        model, info = transformers.AutoModelForImageClassification.from_pretrained(
            path, config=config, local_files_only=True, trust_remote_code=trust_model,
            output_loading_info=True)
    except Exception as error:
        raise ModelError(f"{where}: transformers cannot load the model "
                         f"({type(error).__name__}: {_one_line(error)})") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ModelError(f"{where}: the weights lack {len(missing)} of the model's tensors "
                         f"({shown}), which would start at random; give a folder saved from "
                         f"the fine-tuned classifier itself")
    return model


def _load_processor(transformers, path: Path, trust_model: bool, where: str):
    """The image processor AutoImageProcessor gives (transformers 5: the torchvision backend
    where torchvision is installed)."""
    try:
        return transformers.AutoImageProcessor.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_model)
    except Exception as error:
        raise ModelError(f"{where}: transformers cannot load the image processor of "
                         f"{PROCESSOR_CONFIG} ({type(error).__name__}: "
                         f"{_one_line(error)})") from None


def _pil_twin(transformers, processor, path: Path):
    """The PIL backend of a transformers 5 torchvision-backend processor (None where there
    is none): the reference its attributes are checked against exactly."""
    if getattr(processor, "backend", None) != "torchvision":
        return None
    try:
        twin = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True,
                                                               backend="pil")
    except Exception:  # remote code, or no PIL backend for this processor
        return None
    return twin if getattr(twin, "backend", None) == "pil" else None


def _fallback_preprocessing(config, where: str) -> Preprocessing:
    """No preprocessor_config.json: ImageNet's preprocessing, at the config's image_size."""
    size = getattr(config, "image_size", None)
    chosen = IMAGENET_PREPROCESSING
    if isinstance(size, int) and size > 0 and size != chosen.crop:
        chosen = chosen.with_crop(size)
    print(f"warning: {where}: no {PROCESSOR_CONFIG} in the folder; using ImageNet "
          f"preprocessing (resize {chosen.resize}, crop {chosen.crop}, mean {chosen.mean}, "
          f"std {chosen.std}); give --resize, --crop, --mean and --std if the model was "
          f"trained otherwise", file=sys.stderr)
    return chosen


# ----------------------------------------------------------------------------- preprocessing

@dataclass(frozen=True)
class _Geometry:
    """One reading of a processor's resize and crop: the Preprocessing fields it sets, or
    why this tool cannot reproduce it (naming the attribute)."""

    resize: int = 0
    crop: int = 0
    squash: bool = False
    refused: str = ""


def processor_preprocessing(processor, where: str, twin=None) -> Preprocessing:
    """The ``Preprocessing`` that gives the same model input as a transformers image
    processor, checked on test images against ``twin`` (the same processor's PIL backend)
    when given, else against the processor itself (see ``_verified``); ModelError (SizeError
    for its resize and crop) for what cannot be reproduced exactly."""
    settings = _settings(processor)
    unknown = sorted(name for name, value in settings.items()
                     if name not in _HANDLED and value is not None and value is not False)
    if unknown:
        raise ModelError(f"{where}: sets {unknown[0]}={settings[unknown[0]]!r}, which this tool "
                         f"cannot reproduce")
    if settings.get("do_pad"):
        raise ModelError(f"{where}: do_pad is true (the processor pads images), which this "
                         f"tool cannot reproduce")
    data_format = settings.get("data_format")
    if data_format is not None and "first" not in str(data_format).lower():
        raise ModelError(f"{where}: data_format={data_format} (channels last); this tool gives "
                         f"models channels-first input")
    interpolation = _interpolation(settings.get("resample"), where)
    mean, std, bgr = _normalization(settings, where)
    try:
        readings = _geometries(settings, where)
        usable = [geometry for geometry in readings if not geometry.refused]
        if not usable:
            raise SizeError(f"{where}: {readings[0].refused}; give --resize and --crop")
    except SizeError as error:
        side = IMAGENET_PREPROCESSING
        error.partial = Preprocessing(resize=side.resize, crop=side.crop, mean=mean, std=std,
                                      interpolation=interpolation, crop_offset="floor", bgr=bgr)
        raise
    candidates = [Preprocessing(resize=g.resize, crop=g.crop, mean=mean, std=std,
                                interpolation=interpolation, squash=g.squash,
                                crop_offset="floor", bgr=bgr) for g in usable]
    return _verified(processor, candidates, settings, where, ambiguous=len(readings) > 1,
                     twin=twin)


def _settings(processor) -> dict:
    """The processor's preprocessing settings by name: its valid kwargs (transformers 5) or
    the attributes transformers 4 processors keep."""
    names = getattr(processor, "_valid_kwargs_names", None)
    if names is None:
        names = getattr(processor, "_valid_processor_keys", None)  # transformers 4
    if not names:
        names = [name for name in _HANDLED if hasattr(processor, name)]
    return {name: getattr(processor, name, None) for name in names}


def _size(value, default_to_square) -> dict:
    """A size setting as a dict of its set fields: {"height", "width"} or {"shortest_edge"}..."""
    if value is None:
        return {}
    if isinstance(value, int):
        return ({"height": value, "width": value} if default_to_square is not False
                else {"shortest_edge": value})
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    try:
        return {key: item for key, item in dict(value).items() if item is not None}
    except (TypeError, ValueError):
        return {"unreadable": value}


def _square_crop(settings: dict, where: str) -> int | None:
    """The centre crop's side, None without one; ModelError for a crop that is not square."""
    if not settings.get("do_center_crop"):
        return None
    crop = _size(settings.get("crop_size"), True)
    if set(crop) != {"height", "width"} or crop["height"] != crop["width"]:
        raise SizeError(f"{where}: crop_size {_describe(crop)} is not a square crop; this tool "
                         f"explains square inputs: give --resize and --crop for a square one")
    return int(crop["height"])


def _geometries(settings: dict, where: str) -> list[_Geometry]:
    """The readings of do_resize, size, crop_pct, do_center_crop and crop_size. crop_pct has
    two readings (ConvNeXt's processor and PoolFormer's apply it differently); the test
    images decide between them."""
    if not settings.get("do_resize"):
        raise SizeError(f"{where}: do_resize is false (the model takes images at their own "
                         f"size), which this tool cannot reproduce; give --resize and --crop")
    size = _size(settings.get("size"), settings.get("default_to_square"))
    crop = _square_crop(settings, where)
    crop_pct = settings.get("crop_pct")
    if crop_pct is not None:
        if not (isinstance(crop_pct, (int, float)) and crop_pct > 0):
            raise ModelError(f"{where}: crop_pct={crop_pct!r} is not a positive number")
        return [_convnext_crop_pct(size, crop, float(crop_pct)),
                _poolformer_crop_pct(size, crop, float(crop_pct))]
    if set(size) == {"height", "width"}:
        height, width = int(size["height"]), int(size["width"])
        if height != width:
            raise SizeError(f"{where}: size {height}x{width} (height x width) is not square; "
                             f"this tool explains square inputs: give --resize and --crop for a "
                             f"square one")
        return [_resized_then_cropped(height, crop, squash=True)]
    if set(size) == {"shortest_edge"}:
        if crop is None:
            raise SizeError(f"{where}: size shortest_edge {size['shortest_edge']} without "
                             f"do_center_crop gives inputs of each image's own aspect ratio; "
                             f"this tool explains square inputs: give --resize and --crop")
        return [_resized_then_cropped(int(size["shortest_edge"]), crop, squash=False)]
    raise SizeError(f"{where}: size {_describe(size)} cannot be reproduced (this tool resizes "
                     f"the shorter side or both sides to one length); give --resize and --crop")


def _resized_then_cropped(resize: int, crop: int | None, squash: bool) -> _Geometry:
    if crop is None:
        return _Geometry(resize, resize, squash)
    if crop > resize:
        return _Geometry(refused=f"crop_size {crop} is larger than the resized image ({resize}): "
                                 f"the processor pads it, which this tool cannot reproduce")
    return _Geometry(resize, crop, squash)


def _convnext_crop_pct(size: dict, crop: int | None, crop_pct: float) -> _Geometry:
    """ConvNeXt's processor: size {"shortest_edge": n}; below 384 the shorter side goes to
    int(n / crop_pct) and an n x n centre crop is cut; from 384 on the image is squashed to
    n x n. A further centre crop after that is not reproduced."""
    if set(size) != {"shortest_edge"}:
        return _Geometry(refused=f"crop_pct with size {_describe(size)} cannot be reproduced")
    n = int(size["shortest_edge"])
    if crop is not None:
        return _Geometry(refused="do_center_crop after crop_pct's own crop (two crops in a row) "
                                 "cannot be reproduced")
    if n >= _CONVNEXT_WARP_SIZE:
        return _Geometry(n, n, True)
    return _resized_then_cropped(int(n / crop_pct), n, squash=False)


def _poolformer_crop_pct(size: dict, crop: int | None, crop_pct: float) -> _Geometry:
    """PoolFormer's processor: the shorter side goes to int(n / crop_pct), n being
    shortest_edge or a square size's side; then the usual do_center_crop / crop_size."""
    if set(size) == {"shortest_edge"}:
        n = int(size["shortest_edge"])
    elif set(size) == {"height", "width"} and size["height"] == size["width"]:
        n = int(size["height"])
    else:
        return _Geometry(refused=f"crop_pct with size {_describe(size)} cannot be reproduced")
    if crop is None:
        return _Geometry(refused="crop_pct without do_center_crop gives inputs of each image's "
                                 "own aspect ratio, which this tool cannot reproduce")
    return _resized_then_cropped(int(n / crop_pct), crop, squash=False)


def _describe(size: dict) -> str:
    if set(size) == {"height", "width"}:
        return f"{size['height']}x{size['width']}"
    return ", ".join(f"{key} {value}" for key, value in size.items()) or "(none)"


def _interpolation(resample, where: str) -> str:
    """A processor's ``resample`` (a PIL filter number, or a torchvision InterpolationMode) as
    this tool's interpolation name; None is the processors' default, bilinear."""
    if resample is None:
        return "bilinear"
    mode = getattr(resample, "value", resample)
    if isinstance(mode, str) and mode in _TORCHVISION_MODES:
        return _TORCHVISION_MODES[mode]
    if isinstance(mode, int) and not isinstance(mode, bool) and mode in _PIL_RESAMPLING:
        return _PIL_RESAMPLING[mode]
    raise ModelError(f"{where}: resample={resample!r} cannot be reproduced (this tool resizes "
                     f"with PIL's nearest, bilinear, bicubic, lanczos, box or hamming filter)")


def _channels(value, name: str, where: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        value = (value,) * 3
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ModelError(f"{where}: {name}={value!r} is not one number per RGB channel")
    return values  # type: ignore[return-value]


def _normalization(settings: dict, where: str
                   ) -> tuple[tuple[float, float, float], tuple[float, float, float], bool]:
    """(mean, std, bgr) on [0, 1] pixels: the processor's rescale (factor, EfficientNet's
    offset of -1), normalization, EfficientNet's include_top (a second division by image_std)
    and channel flip folded into one affine map. With 8-bit pixels v the processor computes
    y = (v * f + o - M) / S [/ S_top]; as (v / 255 - mean) / std that is
    std = S' / (255 f), mean = (M - o) / (255 f)."""
    factor, offset = 1.0, 0.0
    if settings.get("do_rescale"):
        factor = settings.get("rescale_factor")
        if not isinstance(factor, (int, float)) or not factor > 0:
            raise ModelError(f"{where}: rescale_factor={factor!r} is not a positive number")
        factor = float(factor)
        offset = -1.0 if settings.get("rescale_offset") else 0.0
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if settings.get("do_normalize"):
        mean = _channels(settings.get("image_mean"), "image_mean", where)
        std = _channels(settings.get("image_std"), "image_std", where)
    if settings.get("include_top"):
        top = _channels(settings.get("image_std"), "image_std", where)
        std = tuple(s * t for s, t in zip(std, top))
    if not all(s > 0 for s in std):
        raise ModelError(f"{where}: image_std {std} has a channel that is not positive")
    bgr = bool(settings.get("do_flip_channel_order"))
    tool_mean = tuple((m - offset) / (255.0 * factor) for m in mean)
    tool_std = tuple(s / (255.0 * factor) for s in std)
    if bgr:  # the processor normalizes RGB channels, then flips; this tool flips first
        tool_mean, tool_std = tool_mean[::-1], tool_std[::-1]
    return tool_mean, tool_std, bgr  # type: ignore[return-value]


# ----------------------------------------------------------------------------- the check

def _test_images(settings: dict):
    """Two colourful, textured images (landscape and portrait, odd sizes so that crop offsets
    round) on which a misread size, crop, filter, normalization or channel order shows. They
    are larger than every size the processor names, so that both sides shrink: torchvision's
    resize, which enlarges differently from PIL's, is then within a level of it."""
    import numpy as np
    from PIL import Image
    lengths = [value for name in ("size", "crop_size")
               for value in _size(settings.get(name), True).values() if isinstance(value, int)]
    big = max([224] + lengths)
    height, width = big * 3 // 2 + 1, big * 2 + 37
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    waves = np.stack([128 + 90 * np.sin(cols / (5 + 2 * c) + c) * np.cos(rows / (7 + c) - c)
                      for c in range(3)], axis=-1)
    noise = np.random.default_rng(0).normal(0.0, 25.0, (height, width, 3))
    pixels = np.clip(waves + noise + np.linspace(-40, 40, width)[None, :, None], 0, 255)
    pixels = pixels.astype(np.uint8)
    portrait = np.ascontiguousarray(pixels[::-1].swapaxes(0, 1))
    return [Image.fromarray(pixels), Image.fromarray(portrait)]


def _verified(processor, candidates: list[Preprocessing], settings: dict, where: str,
              ambiguous: bool, twin=None) -> Preprocessing:
    """The first candidate whose model input equals the reference processor's on the test
    images. The reference is ``twin`` (the PIL backend of a torchvision-backend processor) or
    the processor itself. A PIL backend must agree to float rounding (it resizes with PIL, as
    this tool does); any other to one pixel level (torchvision's antialiased resize rounds
    some pixels to the next level)."""
    import numpy as np

    from ..preprocessing import prepare_image
    reference = twin if twin is not None else processor
    tolerance = (PIL_TOLERANCE_LEVELS if getattr(reference, "backend", None) == "pil"
                 else TORCHVISION_TOLERANCE_LEVELS)
    images = _test_images(settings)
    try:
        expected = [np.asarray(reference(images=image, return_tensors="np")["pixel_values"],
                               dtype=np.float64)[0] for image in images]
    except Exception as error:
        raise ModelError(f"{where}: the image processor {type(reference).__name__} fails on a "
                         f"test image ({type(error).__name__}: {_one_line(error)})") from None
    closest = math.inf
    for candidate in candidates:
        difference = _difference_in_levels(candidate, images, expected, prepare_image)
        if difference <= tolerance:
            return candidate
        closest = min(closest, difference)
    first = candidates[0]
    what = (f"its settings say (read as: resize {first.resize}"
            f"{' both sides' if first.squash else ''}, crop {first.crop}"
            f"{', crop_pct read either way' if ambiguous else ''}, {first.interpolation}, "
            f"mean {_rounded(first.mean)}, std {_rounded(first.std)} on [0, 1] pixels"
            f"{', BGR' if first.bgr else ''})")
    raise ModelError(f"{where}: the image processor {type(reference).__name__} does not do "
                     f"what {what}: its input differs by {closest:.3g} pixel levels on a test "
                     f"image, so this tool cannot reproduce it")


def _difference_in_levels(candidate: Preprocessing, images, expected, prepare_image) -> float:
    """The largest difference between this tool's input and the processor's, in 8-bit pixel
    levels (inf when the shapes differ)."""
    import numpy as np
    scale = np.asarray(candidate.std, dtype=np.float64)[:, None, None] * 255.0
    worst = 0.0
    for image, theirs in zip(images, expected):
        _, ours = prepare_image(image, candidate)
        if ours.shape != theirs.shape:
            return math.inf
        worst = max(worst, float(np.max(np.abs(ours.astype(np.float64) - theirs) * scale)))
    return worst


def _rounded(values) -> tuple:
    return tuple(round(v, 4) for v in values)
