"""Files written by ``torch.save``: unpickled without running code from them (an allow-list
of torch.nn and torchvision classes and of plain records training checkpoints store,
``weights_only=True``), or, for a file the user trusts (``--trust_model``), the ordinary way,
with the current folder importable."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from .base import ModelError

_ALLOWED_PREFIXES = ("torch.nn.", "torchvision.models.", "torchvision.ops.")
# torchvision builds some layers with functools.partial (ViT: partial(nn.LayerNorm, eps=1e-6)).
# A partial only stores its callable when it is unpickled; it is allowed when every partial in
# the loaded object wraps an allowed module class, which is checked before the model is used.
_PARTIAL = "functools.partial"
# Plain records training checkpoints store beside the weights: timm's train.py saves its
# command line as an argparse.Namespace ('args'). Loading one runs no code from the file: the
# weights-only unpickler creates it with Namespace.__new__ (object.__new__, no __init__) and,
# as Namespace has neither __setstate__ nor __setattr__ of its own, only updates its __dict__.
# Its attribute values pass the same weights-only checks as everything else, so a Namespace
# that holds anything unsafe is still refused.
_RECORDS: dict[str, type] = {"argparse.Namespace": argparse.Namespace}


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


def load_file(path: Path, trust_model: bool):
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
    allowed = _allowed_module_classes([name for name in unsafe if name not in _RECORDS])
    foreign = [name for name in unsafe
               if name not in allowed and name != _PARTIAL and name not in _RECORDS]
    if not foreign:
        needed = [functools.partial if name == _PARTIAL else _RECORDS.get(name) or allowed[name]
                  for name in unsafe]
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
        with torch.serialization.safe_globals(
                [*allowed.values(), functools.partial, *_RECORDS.values()]):
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
        elif isinstance(item, (nn.Module, *_RECORDS.values())):
            stack.extend(vars(item).values())
    return [func for func in found if not isinstance(func, functools.partial)]


def _torch_load(path: Path, weights_only: bool):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=weights_only)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        raise ModelError(f"--model_path {path}: cannot read it ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None
