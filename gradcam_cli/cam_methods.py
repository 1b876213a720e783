"""The CAM methods: how one layer's activations (and gradients) become a class's heatmap.

Each method is a small function with the formula of its paper. Notation: A is the target layer's
output (B, C, h, w), G = d y_c / d A the gradient of the class's raw score (same shape), and
every map is (B, h, w) after the final ReLU.

All methods but Eigen-CAM weight the activations and sum over channels: map = ReLU(sum_k W_k A_k).
Their functions return the weights W, which ``weighted_activations`` turns into the per-channel
contributions W_k * A_k (B, C, h, w) that ``combine`` sums over channels or, with eigen
smoothing, projects onto their first principal component (``first_principal_component``).
W is (B, C), one weight per channel (Grad-CAM, Grad-CAM++, XGrad-CAM); (B, C, h, w), one per
channel and location (LayerCAM, HiResCAM); or (B, K, C) for the K classes at once, for the
methods that make forward passes of their own (Score-CAM, Ablation-CAM). Eigen-CAM has no
weights: its map is the first principal component of A itself, the same for every class.

``METHODS`` is the registry the engine and the command line use; ``gradcam.explain`` runs any
of them from one forward pass (plus the methods' own passes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .heads import SOFTMAX, Head
from .layer_layouts import CHANNELS_FIRST, CHANNELS_LAST, Layout

EPS = 1e-7
Progress = Callable[[int, int], None] | None


def grad_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017, arXiv 1610.02391).

    alpha_k = mean_ij G_k,ij;  map = ReLU(sum_k alpha_k A_k).  Returns alpha (B, C).
    """
    return gradient.mean(dim=(2, 3))


def grad_cam_plus_plus(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al. 2018, arXiv 1710.11063), with the paper's exponential
    closed form, in which second and third derivatives are powers of the first:

    a_k,ij = G^2 / (2 G^2 + sum_ab A_k,ab * G^3)   (0 where G = 0)
    w_k = sum_ij a_k,ij * ReLU(G_k,ij);  map = ReLU(sum_k w_k A_k).  Returns w (B, C).
    """
    g2 = gradient.pow(2)
    g3 = gradient.pow(3)
    spatial_sum = activation.sum(dim=(2, 3), keepdim=True)
    denominator = 2 * g2 + spatial_sum * g3
    safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    alpha = torch.where(gradient != 0, g2 / safe, torch.zeros_like(g2))
    return (alpha * torch.relu(gradient)).sum(dim=(2, 3))


def xgrad_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al. 2020, arXiv 2008.02312).

    w_k = sum_ij (A_k,ij / sum_ab A_k,ab) * G_k,ij;  map = ReLU(sum_k w_k A_k).  Returns w.
    """
    spatial_sum = activation.sum(dim=(2, 3), keepdim=True)
    safe = torch.where(spatial_sum.abs() > EPS, spatial_sum, torch.full_like(spatial_sum, EPS))
    return (activation / safe * gradient).sum(dim=(2, 3))


def layer_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021, IEEE TIP 30): a weight per location, not per channel.

    map = ReLU(sum_k ReLU(G_k) * A_k)   (element-wise product).  Returns ReLU(G) (B, C, h, w).
    """
    return torch.relu(gradient)


def hires_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos & Carin 2020, arXiv 2011.08891): the gradient is not averaged.

    map = ReLU(sum_k G_k * A_k)   (element-wise product).  Returns G (B, C, h, w).
    Eigen smoothing gives up the paper's guarantee that the map is exactly what the score
    sums (it holds for the plain sum only).
    """
    return gradient


def score_cam(model: torch.nn.Module, images: torch.Tensor, activation: torch.Tensor,
              classes: torch.Tensor, batch_size: int = 64, progress: Progress = None,
              head: Head = SOFTMAX) -> torch.Tensor:
    """Score-CAM (Wang et al. 2020, arXiv 1910.01279): no gradients, one forward per channel.

    H_k = A_k upsampled to the input size and min-max normalized to [0, 1];
    alpha_k = p_c(X * H_k), the class probability (softmax; a sigmoid head's own sigmoid);
    map = ReLU(sum_k alpha_k A_k).
    Returns alpha (B, K, C) for the (B, K) ``classes``; the masked inputs go through the model
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
    return weights


def _unit_masks(channels: torch.Tensor, size) -> torch.Tensor:
    """(N, 1, h, w) activation channels -> (N, 1, H, W) masks in [0, 1] (flat ones -> 0)."""
    masks = F.interpolate(channels, size=tuple(size), mode="bilinear", align_corners=False)
    low = masks.flatten(1).amin(dim=1)[:, None, None, None]
    high = masks.flatten(1).amax(dim=1)[:, None, None, None]
    span = high - low
    return torch.where(span > EPS, (masks - low) / torch.where(span > EPS, span,
                                                                torch.ones_like(span)),
                       torch.zeros_like(masks))


def ablation_cam(model: torch.nn.Module, images: torch.Tensor, activation: torch.Tensor,
                 classes: torch.Tensor, scores: torch.Tensor, module: torch.nn.Module,
                 layout: Layout, batch_size: int = 64, progress: Progress = None,
                 head: Head = SOFTMAX) -> torch.Tensor:
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020): no gradients, one forward per channel.

    y_c^k is the raw class score (``head.scores``, the logit pytorch-grad-cam's
    ClassifierOutputTarget reads) with channel k of the target layer's output set to zero;
    w_k = (y_c - y_c^k) / y_c;  map = ReLU(sum_k w_k A_k).

    The division by y_c (the paper's and pytorch-grad-cam's) scales an image's map for class c
    by one number, so it changes nothing for a class with a positive score; for a class with
    a negative score it flips every weight, and the map shows the channels whose removal
    raises the score (what argues against the class) rather than those that support it.
    Where |y_c| <= 1e-7 the divisor is 1e-7.

    Each pass runs ``batch_size`` (image, channel) pairs through the model, with a forward
    hook on ``module`` that replaces its output by a copy with that channel zeroed: the axis
    ``layout`` says is the channels (for token outputs, the patch tokens only: the special
    tokens are no part of A_k). A module that runs several times in a pass (a shared
    activation module) is ablated at its last call only, the call whose output A is (as the
    engine keeps it): one pass on one image counts the calls first. One pass per channel
    serves all K classes: B * C forward passes in all. ``scores``
    are the (B, C) raw scores of the unablated images. Returns w (B, K, C).
    """
    n_images, n_channels = activation.shape[:2]
    original = scores.detach().gather(1, classes).float()
    ablated = torch.empty(n_images, classes.shape[1], n_channels, device=original.device)
    pairs = [(b, k) for b in range(n_images) for k in range(n_channels)]
    zeroed: dict[str, torch.Tensor] = {}
    calls = {"per_pass": _calls_per_pass(model, module, images[:1]), "seen": 0}

    def ablate(hooked, inputs, output):
        calls["seen"] += 1
        if calls["seen"] != calls["per_pass"]:
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"target layer {hooked.__class__.__name__} returned "
                            f"{type(output).__name__}, not a tensor")
        return _zero_channels(output, layout, zeroed["channels"])

    handle = module.register_forward_hook(ablate)
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            index_b = torch.tensor([b for b, _ in chunk], device=images.device)
            zeroed["channels"] = torch.tensor([k for _, k in chunk], device=images.device)
            calls["seen"] = 0
            chosen = head.scores(model(images[index_b])).gather(1, classes[index_b])
            ablated[index_b, :, zeroed["channels"]] = chosen.to(ablated.dtype)
            if progress is not None:
                progress(min(start + batch_size, len(pairs)), len(pairs))
    finally:
        handle.remove()
    divisor = torch.where(original.abs() > EPS, original, torch.full_like(original, EPS))
    return (original.unsqueeze(2) - ablated) / divisor.unsqueeze(2)


def _calls_per_pass(model: torch.nn.Module, module: torch.nn.Module,
                    images: torch.Tensor) -> int:
    """How many times ``module`` runs in one forward pass of ``model``."""
    count = [0]

    def counted(*_) -> None:
        count[0] += 1

    handle = module.register_forward_hook(counted)
    try:
        model(images)
    finally:
        handle.remove()
    return count[0]


def _zero_channels(output: torch.Tensor, layout: Layout, channels: torch.Tensor
                   ) -> torch.Tensor:
    """A copy of ``output`` (N images of ``layout``) with channel ``channels[n]`` of image n
    set to zero."""
    if output.shape[0] != channels.shape[0]:
        raise ValueError(f"the target layer's output has {output.shape[0]} images where the "
                         f"ablation pass fed {channels.shape[0]}")
    copy = output.clone()
    rows = torch.arange(copy.shape[0], device=copy.device)
    channels = channels.to(copy.device)
    if layout.kind == CHANNELS_FIRST:
        copy[rows, channels] = 0
    elif layout.kind == CHANNELS_LAST:
        copy[rows, :, :, channels] = 0
    else:  # tokens (N, T, D): the patch tokens' feature; a basic slice is a view of the copy
        copy[:, layout.special:][rows, :, channels] = 0
    return copy


def eigen_cam(activation: torch.Tensor) -> torch.Tensor:
    """Eigen-CAM (Bany Muhammad & Yeasin 2020, arXiv 2008.00299): no gradients, no class.

    Per image, the (h*w, C) matrix of A is centred over positions, its first right singular
    vector v taken, and the positions projected on it: map = ReLU((A - mean) v), (B, h, w).
    The sign of v is ``first_principal_component``'s rule: the projection correlates
    positively with the sum of A over channels (the unweighted CAM).
    """
    return torch.relu(first_principal_component(activation))


def first_principal_component(contributions: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h, w): each image's positions projected on the first principal
    direction of its C channels (the (h*w, C) matrix X centred over positions, X_c = X - mean;
    v its first right singular vector; projection X_c v). Computed in float64, returned in
    the input's dtype.

    Sign rule: an SVD's singular vectors are defined up to sign; v is oriented so that the
    projection correlates positively with sum_k X_k, the sum over channels (Eigen-CAM: of the
    activations; eigen smoothing: the method's own map before its ReLU), so the smoothed map
    points the way the plain one does. Since the projection has mean zero, that correlation is
    sigma_1^2 (v . 1) / norms: the rule is the same as "v's components sum to a positive
    number". Where it is zero (|correlation| <= 1e-6, e.g. an all-zero matrix), the
    projection's value of largest magnitude is made positive instead.
    """
    n_images, _, height, width = contributions.shape
    device = contributions.device
    work = contributions.detach().to("cpu" if device.type == "mps" else device, torch.float64)
    positions = work.flatten(2).transpose(1, 2)  # (B, h*w, C)
    centred = positions - positions.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = (centred @ vh[:, 0, :].unsqueeze(2)).squeeze(2)  # (B, h*w)
    channel_sum = centred.sum(dim=2)
    norms = projection.norm(dim=1) * channel_sum.norm(dim=1)
    correlation = (projection * channel_sum).sum(dim=1) / torch.where(
        norms > 0, norms, torch.ones_like(norms))
    peak = projection.gather(1, projection.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    sign = torch.where(correlation.abs() > 1e-6, correlation.sign(), peak.sign())
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    projection = projection * sign.unsqueeze(1)
    return projection.view(n_images, height, width).to(device, contributions.dtype)


def weighted_activations(weights: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """W_k * A_k (B, C, h, w): what a method sums over channels, for channel weights (B, C)
    or element-wise weights (B, C, h, w)."""
    if weights.dim() == 2:
        return weights[:, :, None, None] * activation
    return weights * activation


def combine(weights: torch.Tensor, activation: torch.Tensor, eigen: bool = False
            ) -> torch.Tensor:
    """One class's map (B, h, w) from a method's weights: ReLU(sum_k W_k A_k), or with
    ``eigen`` (eigen smoothing, as pytorch-grad-cam's eigen_smooth) ReLU of the first
    principal component of the W_k A_k instead of their sum."""
    if eigen:
        return torch.relu(first_principal_component(weighted_activations(weights, activation)))
    if weights.dim() == 2:
        return torch.relu(torch.einsum("bc,bchw->bhw", weights, activation))
    return torch.relu((weights * activation).sum(dim=1))


def class_maps(weights: torch.Tensor, activation: torch.Tensor, eigen: bool = False
               ) -> torch.Tensor:
    """(B, K, h, w) maps from per-class channel weights (B, K, C) (Score-CAM, Ablation-CAM)."""
    weights = weights.to(activation.dtype)
    if not eigen:
        return torch.relu(torch.einsum("bkc,bchw->bkhw", weights, activation))
    return torch.stack([combine(weights[:, k], activation, eigen=True)
                        for k in range(weights.shape[1])], dim=1)


@dataclass(frozen=True)
class CamMethod:
    """A registry entry: its display name and exactly one formula, of one of four kinds.

    * ``from_gradients(A, G)``: the weights from the shared forward and backward pass;
    * ``from_activations(A)``: a class-independent map (B, h, w) from the shared forward pass
      alone (Eigen-CAM);
    * ``from_scores(model, images, A, classes, batch_size, progress, head)``: (B, K, C)
      weights from forward passes of its own on modified inputs (Score-CAM);
    * ``from_ablation(model, images, A, classes, scores, module, layout, batch_size,
      progress, head)``: (B, K, C) weights from passes of its own with the target module's
      output modified by a hook (Ablation-CAM).
    """

    name: str
    from_gradients: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    from_scores: Callable[..., torch.Tensor] | None = None
    from_activations: Callable[[torch.Tensor], torch.Tensor] | None = None
    from_ablation: Callable[..., torch.Tensor] | None = None

    def __post_init__(self) -> None:
        given = [f.name for f in fields(self) if f.name != "name" and getattr(self, f.name)]
        if len(given) != 1:
            raise ValueError(f"{self.name}: give exactly one formula, got {given or 'none'}")

    @property
    def formula(self) -> Callable[..., torch.Tensor]:
        """The method's one function (whichever kind it is)."""
        return (self.from_gradients or self.from_activations or self.from_scores
                or self.from_ablation)

    @property
    def uses_gradients(self) -> bool:
        return self.from_gradients is not None

    @property
    def runs_own_passes(self) -> bool:
        """Whether it makes forward passes of its own (B * C of them) after the shared one."""
        return self.from_scores is not None or self.from_ablation is not None


METHODS: dict[str, CamMethod] = {
    "gradcam": CamMethod("Grad-CAM", from_gradients=grad_cam),
    "gradcam++": CamMethod("Grad-CAM++", from_gradients=grad_cam_plus_plus),
    "xgradcam": CamMethod("XGrad-CAM", from_gradients=xgrad_cam),
    "layercam": CamMethod("LayerCAM", from_gradients=layer_cam),
    "hirescam": CamMethod("HiResCAM", from_gradients=hires_cam),
    "scorecam": CamMethod("Score-CAM", from_scores=score_cam),
    "eigencam": CamMethod("Eigen-CAM", from_activations=eigen_cam),
    "ablationcam": CamMethod("Ablation-CAM", from_ablation=ablation_cam),
}
