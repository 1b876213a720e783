"""Labels: reading a labels file safely, the bundled ImageNet names, and matching names.

A labels file is a Python dict literal ``{0: 'cat', 1: 'dog', ...}``, read with
``ast.literal_eval`` (never ``eval``). ``LabelIndex`` finds a class by any of its names,
ignoring case, underscores and spacing.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .errors import InputError

IMAGENET_LABELS_PATH = Path(__file__).resolve().parent / "imagenet1000_labels.txt"


def read_labels(labels_path: str | Path, n_classes: int) -> list[str]:
    """Read a ``{0: 'cat', 1: 'dog', ...}`` file safely (``ast.literal_eval``, never eval) for
    a model of ``n_classes`` outputs. A binary model (one output) takes one name, the positive
    class's, or two: what argues against it, then it."""
    labels = read_labels_file(labels_path)
    if n_classes == 1 and len(labels) in (1, 2):
        return binary_labels(labels)
    if len(labels) != n_classes:
        wanted = ("1 entry (the positive class) or 2 (negative, positive)" if n_classes == 1
                  else f"{n_classes} entries")
        raise InputError(f"--labels_path {labels_path} has {len(labels)} labels but the model "
                         f"has {n_classes} outputs; give a labels file with {wanted}")
    return labels


def binary_labels(names: list[str] | None) -> list[str]:
    """The two classes of a binary model (one output y, explained as [-y, y]): what argues
    against the positive class, then the positive class."""
    if not names:
        return ["negative", "positive"]
    if len(names) == 1:
        return [f"not {names[0]}", names[0]]
    return list(names[:2])


def read_labels_file(labels_path: str | Path) -> list[str]:
    """The names of a labels file, in class order; any count."""
    path = Path(labels_path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"--labels_path {labels_path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"--labels_path {labels_path}: cannot read it ({error})") from None
    try:
        labels = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as error:
        raise InputError(f"--labels_path {labels_path}: not a Python dict literal like "
                         f"{{0: 'cat', 1: 'dog'}} ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else 'no details'})") from None
    if not isinstance(labels, dict) or not labels:
        found = "an empty dict" if labels == {} else f"a {type(labels).__name__}"
        raise InputError(f"--labels_path {labels_path}: expected a dict like "
                         f"{{0: 'cat', 1: 'dog'}}, found {found}")
    if any(not isinstance(k, int) or isinstance(k, bool) for k in labels) \
            or sorted(labels) != list(range(len(labels))):
        raise InputError(f"--labels_path {labels_path}: the keys must be the integers "
                         f"0..{len(labels) - 1}, each once")
    return [str(labels[i]) for i in range(len(labels))]


def default_labels(n_classes: int) -> list[str]:
    """ImageNet names for a 1000-class model, 'negative' and 'positive' for a binary one (one
    output), else ``class i``."""
    if n_classes == 1:
        return binary_labels(None)
    if n_classes == 1000:
        return read_labels(IMAGENET_LABELS_PATH, n_classes)
    return [f"class {i}" for i in range(n_classes)]


def name_key(name: str) -> str:
    """Case, underscores and spacing do not matter when names are compared."""
    return ", ".join(" ".join(part.replace("_", " ").split())
                     for part in name.split(",")).lower()


class LabelIndex:
    """Class indices by name: a full label or any of its comma-separated names."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self._by_name: dict[str, int] = {}
        for index, label in enumerate(labels):
            for name in [label] + label.split(","):
                self._by_name.setdefault(name_key(name), index)

    def find(self, name: str | None, allow_index: bool = False) -> int | None:
        """The class a name stands for, else None. With ``allow_index`` a number in range is
        taken as an index, but only when no label is spelt that way."""
        if name is None:
            return None
        found = self._by_name.get(name_key(name))
        if found is None and allow_index and name.strip().isdecimal() \
                and int(name) < len(self.labels):
            found = int(name)
        return found

    def names(self, label: str) -> set[str]:
        """Every way ``label`` may be written: whole, or any of its comma-separated names."""
        return {name_key(name) for name in [label] + label.split(",")}

    def suggestions(self, name: str) -> list[str]:
        import difflib
        keys = difflib.get_close_matches(name_key(name), list(self._by_name), n=6)
        close = dict.fromkeys(self.labels[self._by_name[k]] for k in keys)
        return list(close)[:3]


def first_name(label: str) -> str:
    """'tench, Tinca tinca' -> 'tench'."""
    return label.split(",")[0].strip()
