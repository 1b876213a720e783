"""What every model form's loader returns, and the error a model that cannot be loaded
raises."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import InputError
from ..preprocessing import Preprocessing

BUILTIN_MODEL = "efficientnet-lite0"


class ModelError(InputError):
    """A model that cannot be loaded, with a message that names the input and the fix."""


@dataclass
class LoadedModel:
    """A model ready to explain: the module, the preprocessing it was made for, and what its
    own files say about its classes: their names (a Hugging Face config's id2label) and
    whether its head is multi-label (sigmoid per class)."""

    model: nn.Module
    preprocessing: Preprocessing
    labels: list[str] | None = None
    multi_label: bool = False


class SizeError(ModelError):
    """A processor whose resize or crop this tool cannot reproduce (a non-square size, no
    resize, padding...), though the rest of it (filter, normalization, channel order) reads
    exactly: ``partial`` is that reading, with the resize and crop left to --resize and
    --crop, and ``loaded`` (set by ``load_folder``) the model with it. A caller given both
    flags can go on with ``loaded``; without them the message stands."""

    partial: Preprocessing | None = None
    loaded: LoadedModel | None = None
