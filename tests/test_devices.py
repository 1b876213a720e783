"""CPU and CUDA give the same maps and scores, within what TF32 arithmetic allows.

Skipped without CUDA. On a GPU, torch lets cuDNN convolutions use TF32 (10-bit mantissa) by
default, so scores and maps differ from the CPU's float32 by about 1e-3 relative; the
tolerances below allow that and nothing more.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gradcam_cli.gradcam import conv_layers_in_run_order, explain, top_and_lowest
from gradcam_cli.images import list_images, load_rgb
from gradcam_cli.models import load_model
from gradcam_cli.preprocessing import prepare_image

DATA = Path(__file__).resolve().parent.parent / "data"

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_cpu_and_cuda_agree_on_the_builtin_model(method: str) -> None:
    loaded_model = load_model(None)
    model, preprocessing = loaded_model.model, loaded_model.preprocessing
    model.eval()
    images = torch.from_numpy(np.stack([prepare_image(load_rgb(e.path), preprocessing)[1]
                                        for e in list_images(DATA)]))
    convs, _ = conv_layers_in_run_order(model, images[:1])
    layers = [convs[-1].module, convs[-2].module]
    classes = top_and_lowest(model(images).detach())  # the same classes on both devices
    cpu_scores, cpu_maps = explain(model, images, layers, classes, method=method)
    model.cuda()
    try:
        cuda_scores, cuda_maps = explain(model, images.cuda(), layers, classes.cuda(),
                                         method=method)
    finally:
        model.cpu()
    torch.testing.assert_close(cuda_scores.cpu(), cpu_scores, rtol=1e-2, atol=2e-2)
    # Maps are in [0, 1]; TF32 moves a pixel by a few 1e-3 at most, and the mean by far less.
    difference = (cuda_maps.cpu() - cpu_maps).abs()
    assert difference.max() < 5e-2
    assert difference.mean() < 5e-3


def test_inputs_normalized_on_cuda_equal_the_cpu_ones() -> None:
    """The batch run normalizes uint8 crops on the model's device: on CUDA the float32
    division and subtraction are IEEE-rounded too, so every pixel value gives the CPU's bits."""
    from gradcam_cli.preprocessing import normalize
    preprocessing = load_model(None).preprocessing
    every_value = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None, None], 3, axis=3)
    shown = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(every_value, (2, 256, 4, 3))))
    on_cpu = normalize(shown, preprocessing, torch.device("cpu"))
    on_cuda = normalize(shown, preprocessing, torch.device("cuda")).cpu()
    assert torch.equal(on_cpu, on_cuda)
