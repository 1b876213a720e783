"""How a model's output becomes class scores, and the scores probabilities.

Pure torch. Models return their scores in many forms: a (B, C) tensor (torchvision), an object
with ``.logits`` (Hugging Face), a dict with ``'logits'``, or a tuple or list whose first item
is the scores (GoogLeNet and Inception with auxiliary outputs, many research models).
``class_scores`` takes any of them; the engine, the metrics, Score-CAM and guided
backpropagation all call the model through it.

A ``Head`` says how the scores read as probabilities:

* ``softmax``: one class per image (a softmax over the C scores);
* ``sigmoid``: multi-label, each class its own sigmoid (BCEWithLogits training);
* ``binary``: one output y, probability sigmoid(y). Its scores become two columns, [-y, y]:
  class 1 is the positive class and class 0 what argues against it, so the map of class 0 is
  exactly the counterfactual of class 1 (the gradient of -y is minus that of y), and the
  probabilities sigmoid(-y) = 1 - sigmoid(y) and sigmoid(y) sum to one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["Head", "SOFTMAX", "SIGMOID", "BINARY", "HEADS", "OutputError", "class_scores"]


class OutputError(ValueError):
    """A model output that holds no (B, C) tensor of class scores."""


def class_scores(output) -> torch.Tensor:
    """The (B, C) class scores in a model's output, whatever form it takes."""
    scores = output
    if not isinstance(scores, torch.Tensor):
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor):
            scores = logits
        elif isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
            scores = output["logits"]
        elif isinstance(output, (tuple, list)) and output \
                and isinstance(output[0], torch.Tensor):
            scores = output[0]
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise OutputError(f"the model must return (batch, classes) scores: a tensor, an "
                          f"object with .logits, a dict with 'logits', or a tuple whose first "
                          f"item is the scores; it returned {describe_output(output)}")
    return scores


def describe_output(output) -> str:
    """A few words on what a model returned: its type and, for tensors, their shapes."""
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    if isinstance(output, (tuple, list)):
        items = ", ".join(describe_output(item) for item in output[:3])
        more = ", ..." if len(output) > 3 else ""
        return f"a {type(output).__name__} of {len(output)} ({items}{more})"
    if isinstance(output, Mapping):
        return f"a {type(output).__name__} with keys {', '.join(map(str, list(output)[:5]))}"
    return f"a {type(output).__name__}"


@dataclass(frozen=True)
class Head:
    """How a model's output reads as class scores and probabilities (see the module doc)."""

    kind: str = "softmax"

    def scores(self, output) -> torch.Tensor:
        """(B, C) class scores; a binary head's one output y becomes [-y, y]."""
        scores = class_scores(output)
        if self.kind == "binary":
            if scores.shape[1] != 1:
                raise OutputError(f"a binary head has one output; the model returned "
                                  f"{scores.shape[1]}")
            return torch.cat([-scores, scores], dim=1)
        return scores

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """Float32 probabilities of ``scores`` (as ``scores`` returns them)."""
        if self.kind == "softmax":
            return torch.softmax(scores.float(), dim=1)
        return torch.sigmoid(scores.float())


SOFTMAX, SIGMOID, BINARY = Head("softmax"), Head("sigmoid"), Head("binary")
HEADS = {head.kind: head for head in (SOFTMAX, SIGMOID, BINARY)}
