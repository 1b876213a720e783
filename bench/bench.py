"""Benchmark: our Grad-CAM against plain inference and against pytorch-grad-cam.

Run by hand (never by the tests):  pip install -r requirements-bench.txt
                                    python bench/bench.py [--device cuda]

Every comparison is timed interleaved in this one process (A, B, A, B, ...) and reports the
median of several repeats, so machine noise hits both sides alike. Parts:
  a. 4 maps per image (top-3 + lowest) at the last conv layer vs a plain inference forward
  b. the same 4 maps vs pytorch-grad-cam (one GradCAM call per class)
  c. 4 classes x 3 layers (backcounts 1, 3, 4) vs a plain inference forward
  d. end to end: main.py --n_images all with figures vs the usual way (pytorch-grad-cam once
     per class, a new matplotlib subplots figure per image)
  e. peak memory (max RSS) of main.py for N and 10 N images
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

import main as cli  # noqa: E402
from gradcam import conv_layers_in_run_order, grad_cam, top_and_lowest  # noqa: E402
from models import BUILTIN_MODEL, load_model  # noqa: E402
from utils import IMAGENET_PREPROCESSING, list_images, load_rgb, prepare_image  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[BUILTIN_MODEL, "resnet50", "vgg16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--e2e_images", type=int, default=64)
    parser.add_argument("--e2e_repeats", type=int, default=3)
    parser.add_argument("--memory_images", type=int, default=64,
                        help="peak memory is measured for this many and 10x as many images")
    parser.add_argument("--parts", default="abcde")
    return parser


# ----------------------------------------------------------------------------- helpers

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(functions: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function, timed A, B, A, B, ... after one warm-up each."""
    times = {name: [] for name in functions}
    for function in functions.values():
        function()
    synchronize(device)
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_model(name: str, device: torch.device) -> tuple[torch.nn.Module, object]:
    """The built-in model with its weights; torchvision models with random weights."""
    if name == BUILTIN_MODEL:
        model, preprocessing = load_model(None)
    else:
        model, preprocessing = torchvision.models.get_model(name, weights=None), \
            IMAGENET_PREPROCESSING
    return model.eval().to(device), preprocessing


def image_batch(preprocessing, batch_size: int, device: torch.device) -> torch.Tensor:
    entries = list_images(ROOT / "data")
    inputs = [prepare_image(load_rgb(e.path), preprocessing)[1] for e in entries]
    inputs = [inputs[i % len(inputs)] for i in range(batch_size)]
    return torch.from_numpy(np.stack(inputs)).to(device)


def pytorch_grad_cam_maps(cam, images: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """The same 4 maps with pytorch-grad-cam: one call (forward + backward) per class."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    maps = []
    for k in range(classes.shape[1]):
        targets = [ClassifierOutputTarget(int(c)) for c in classes[:, k]]
        maps.append(cam(input_tensor=images, targets=targets))
    return np.stack(maps, axis=1)


# ----------------------------------------------------------------------------- parts a-c

def engine_parts(name: str, args, device: torch.device) -> list[str]:
    from pytorch_grad_cam import GradCAM
    model, preprocessing = bench_model(name, device)
    images = image_batch(preprocessing, args.batch_size, device)
    convs, _ = conv_layers_in_run_order(model, images[:1])
    last = [convs[-1].module]
    three = [convs[len(convs) - b].module for b in (1, 3, 4)]
    with torch.inference_mode():
        classes = top_and_lowest(model(images))

    def plain():
        with torch.inference_mode():
            model(images)

    functions = {"plain": plain,
                 "ours": lambda: grad_cam(model, images, last, top_and_lowest),
                 "ours_3_layers": lambda: grad_cam(model, images, three, top_and_lowest)}
    if "b" in args.parts:
        cam = GradCAM(model=model, target_layers=last)
        functions["pytorch_grad_cam"] = lambda: pytorch_grad_cam_maps(cam, images, classes)
    t = interleaved(functions, args.repeats, device)
    per_image = {k: v / args.batch_size * 1000 for k, v in t.items()}
    rows = []
    if "a" in args.parts:
        rows.append(f"| a | {name} | ours 4 maps / plain forward | {per_image['ours']:.1f} / "
                    f"{per_image['plain']:.1f} ms/img | **{t['ours'] / t['plain']:.2f}x** "
                    f"| <= 1.3x |")
    if "b" in args.parts:
        rows.append(f"| b | {name} | pytorch-grad-cam / ours, 4 maps | "
                    f"{per_image['pytorch_grad_cam']:.1f} / {per_image['ours']:.1f} ms/img | "
                    f"**{t['pytorch_grad_cam'] / t['ours']:.1f}x faster** | >= 10x |")
    if "c" in args.parts:
        rows.append(f"| c | {name} | ours 4 maps x 3 layers / plain forward | "
                    f"{per_image['ours_3_layers']:.1f} / {per_image['plain']:.1f} ms/img | "
                    f"**{t['ours_3_layers'] / t['plain']:.2f}x** | <= 1.8x |")
    return rows


# ----------------------------------------------------------------------------- part d

def copy_images(target: Path, count: int) -> Path:
    """``count`` images in ImageFolder layout: copies of data/ under new names."""
    sources = list_images(ROOT / "data")
    for i in range(count):
        entry = sources[i % len(sources)]
        folder = target / (entry.folder_label or "images")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(entry.path, folder / f"{i:05d}{entry.path.suffix}")
    return target


def usual_way(model, preprocessing, layer, images_dir: Path, save_dir: Path,
              labels: list[str], device: torch.device) -> None:
    """What people write by hand: pytorch-grad-cam per class, a new figure per image."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    cam = GradCAM(model=model, target_layers=[layer])
    save_dir.mkdir(parents=True, exist_ok=True)
    for entry in list_images(images_dir):
        shown, model_input = prepare_image(load_rgb(entry.path), preprocessing)
        image = torch.from_numpy(model_input)[None].to(device)
        with torch.no_grad():
            scores = model(image)
        classes = top_and_lowest(scores)
        probabilities = torch.softmax(scores, 1)[0]
        maps = pytorch_grad_cam_maps(cam, image, classes)[0]
        figure, axes = plt.subplots(1, 5, figsize=(15, 3.6))
        axes[0].imshow(shown)
        for k in range(4):
            axes[k + 1].imshow(show_cam_on_image(shown / 255.0, maps[k], use_rgb=True))
            c = int(classes[0, k])
            axes[k + 1].set_title(f"{labels[c]} {probabilities[c].item():.1%}")
        for ax in axes:
            ax.axis("off")
        figure.savefig(save_dir / f"image{entry.index}.jpg")
        plt.close(figure)


def end_to_end(name: str, args, device: torch.device, workdir: Path) -> list[str]:
    model, preprocessing = bench_model(name, device)
    images_dir = copy_images(workdir / "images", args.e2e_images)
    if name == BUILTIN_MODEL:
        model_args = []
    else:
        model_file = workdir / f"{name}.pt"
        torch.save(model.cpu(), model_file)
        model.to(device)
        model_args = ["--model_path", str(model_file)]
    convs, scores = conv_layers_in_run_order(
        model, torch.zeros(1, 3, preprocessing.crop, preprocessing.crop, device=device))
    from utils import default_labels
    labels = default_labels(scores.shape[1])
    ours_args = model_args + ["--images_path", str(images_dir), "--n_images", "all",
                              "--save_dir", str(workdir / "ours"), "--quiet",
                              "--device", device.type]
    functions = {
        "ours": lambda: cli.main(ours_args),
        "usual": lambda: usual_way(model, preprocessing, convs[-1].module, images_dir,
                                   workdir / "usual", labels, device)}
    t = interleaved(functions, args.e2e_repeats, device)
    n = args.e2e_images
    return [f"| d | {name} | end to end, {n} images: usual way / main.py | "
            f"{n / t['usual']:.1f} / {n / t['ours']:.1f} images/s | "
            f"**{t['usual'] / t['ours']:.1f}x faster** | >= 5x |"]


# ----------------------------------------------------------------------------- part e

def peak_memory_mb(images_dir: Path, save_dir: Path, device: torch.device) -> float:
    """Max RSS of a fresh main.py run (the largest process of its tree), in MiB."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    command = [sys.executable, "-c", probe, sys.executable, str(ROOT / "main.py"),
               "--images_path", str(images_dir), "--n_images", "all", "--quiet",
               "--save_dir", str(save_dir), "--device", device.type]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return int(output.strip().splitlines()[-1]) / 1024.0


def memory_part(args, device: torch.device, workdir: Path) -> list[str]:
    small, large = args.memory_images, args.memory_images * 10
    small_mb = peak_memory_mb(copy_images(workdir / "small", small), workdir / "out_s", device)
    large_mb = peak_memory_mb(copy_images(workdir / "large", large), workdir / "out_l", device)
    return [f"| e | {BUILTIN_MODEL} | peak memory (max RSS), {small} / {large} images | "
            f"{small_mb:.0f} / {large_mb:.0f} MiB | **{large_mb / small_mb:.2f}x** | about 1x |"]


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    print(f"device: {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, median of {args.repeats}", flush=True)
    rows = ["| part | model | what | measured | ratio | target |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if set("abc") & set(args.parts):
                rows += engine_parts(name, args, device)
                print(rows[-1], flush=True)
            if "d" in args.parts:
                rows += end_to_end(name, args, device, Path(tmp) / name)
                print(rows[-1], flush=True)
        if "e" in args.parts:
            rows += memory_part(args, device, Path(tmp) / "memory")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
