"""The CAM methods: how one layer's activations (and gradients) become a class's heatmap.

Each method is a small function with the formula of its paper. Notation: A is the target layer's
output (B, C, h, w), G = d y_c / d A the gradient of the class's raw score (same shape), and
every map is (B, h, w) after the final ReLU. ``METHODS`` is the registry the engine and the
command line use; ``gradcam.explain`` runs any of them from one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .heads import SOFTMAX, Head

EPS = 1e-7
Progress = Optional[Callable[[int, int], None]]


def grad_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017, arXiv 1610.02391).

    alpha_k = mean_ij G_k,ij;  map = ReLU(sum_k alpha_k A_k).
    """
    alpha = gradient.mean(dim=(2, 3))
    return torch.relu(torch.einsum("bc,bchw->bhw", alpha, activation))


def grad_cam_plus_plus(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al. 2018, arXiv 1710.11063), with the paper's exponential
    closed form, in which second and third derivatives are powers of the first:

    a_k,ij = G^2 / (2 G^2 + sum_ab A_k,ab * G^3)   (0 where G = 0)
    w_k = sum_ij a_k,ij * ReLU(G_k,ij);  map = ReLU(sum_k w_k A_k).
    """
    g2 = gradient.pow(2)
    g3 = gradient.pow(3)
    spatial_sum = activation.sum(dim=(2, 3), keepdim=True)
    denominator = 2 * g2 + spatial_sum * g3
    safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    alpha = torch.where(gradient != 0, g2 / safe, torch.zeros_like(g2))
    weights = (alpha * torch.relu(gradient)).sum(dim=(2, 3))
    return torch.relu(torch.einsum("bc,bchw->bhw", weights, activation))


def xgrad_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al. 2020, arXiv 2008.02312).

    w_k = sum_ij (A_k,ij / sum_ab A_k,ab) * G_k,ij;  map = ReLU(sum_k w_k A_k).
    """
    spatial_sum = activation.sum(dim=(2, 3), keepdim=True)
    safe = torch.where(spatial_sum.abs() > EPS, spatial_sum, torch.full_like(spatial_sum, EPS))
    weights = (activation / safe * gradient).sum(dim=(2, 3))
    return torch.relu(torch.einsum("bc,bchw->bhw", weights, activation))


def layer_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021, IEEE TIP 30): a weight per location, not per channel.

    map = ReLU(sum_k ReLU(G_k) * A_k)   (element-wise product).
    """
    return torch.relu((torch.relu(gradient) * activation).sum(dim=1))


def hires_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos & Carin 2020, arXiv 2011.08891): the gradient is not averaged.

    map = ReLU(sum_k G_k * A_k)   (element-wise product).
    """
    return torch.relu((gradient * activation).sum(dim=1))


def score_cam(model: torch.nn.Module, images: torch.Tensor, activation: torch.Tensor,
              classes: torch.Tensor, batch_size: int = 64, progress: Progress = None,
              head: Head = SOFTMAX) -> torch.Tensor:
    """Score-CAM (Wang et al. 2020, arXiv 1910.01279): no gradients, one forward per channel.

    H_k = A_k upsampled to the input size and min-max normalized to [0, 1];
    alpha_k = p_c(X * H_k), the class probability (softmax; a sigmoid head's own sigmoid);
    map = ReLU(sum_k alpha_k A_k).
    Returns (B, K, h, w) for the (B, K) ``classes``; the masked inputs go through the model
    ``batch_size`` at a time (B * C forward passes in all).
    """
    n_images, n_channels = activation.shape[:2]
    weights = torch.empty(n_images, classes.shape[1], n_channels, device=activation.device)
    pairs = [(b, k) for b in range(n_images) for k in range(n_channels)]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        index_b = torch.tensor([b for b, _ in chunk], device=images.device)
        index_k = torch.tensor([k for _, k in chunk], device=images.device)
        masks = _unit_masks(activation[index_b, index_k].unsqueeze(1), images.shape[-2:])
        masked = images[index_b] * masks
        probabilities = head.probabilities(head.scores(model(masked)))
        chosen = probabilities.gather(1, classes[index_b])
        weights[index_b, :, index_k] = chosen.to(weights.dtype)
        if progress is not None:
            progress(min(start + batch_size, len(pairs)), len(pairs))
    return torch.relu(torch.einsum("bkc,bchw->bkhw", weights, activation))


def _unit_masks(channels: torch.Tensor, size) -> torch.Tensor:
    """(N, 1, h, w) activation channels -> (N, 1, H, W) masks in [0, 1] (flat ones -> 0)."""
    masks = F.interpolate(channels, size=tuple(size), mode="bilinear", align_corners=False)
    low = masks.flatten(1).amin(dim=1)[:, None, None, None]
    high = masks.flatten(1).amax(dim=1)[:, None, None, None]
    span = high - low
    return torch.where(span > EPS, (masks - low) / torch.where(span > EPS, span,
                                                                torch.ones_like(span)),
                       torch.zeros_like(masks))


@dataclass(frozen=True)
class CamMethod:
    """A registry entry: a gradient formula, or (Score-CAM) a forward-pass one."""

    name: str
    from_gradients: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    from_scores: Optional[Callable[..., torch.Tensor]] = None

    @property
    def uses_gradients(self) -> bool:
        return self.from_gradients is not None


METHODS: dict[str, CamMethod] = {
    "gradcam": CamMethod("Grad-CAM", from_gradients=grad_cam),
    "gradcam++": CamMethod("Grad-CAM++", from_gradients=grad_cam_plus_plus),
    "xgradcam": CamMethod("XGrad-CAM", from_gradients=xgrad_cam),
    "layercam": CamMethod("LayerCAM", from_gradients=layer_cam),
    "hirescam": CamMethod("HiResCAM", from_gradients=hires_cam),
    "scorecam": CamMethod("Score-CAM", from_scores=score_cam),
}
