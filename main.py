"""Grad-CAM from the command line: where does a trained CNN look when it classifies an image?

For each image: a figure with the image as the model saw it and Grad-CAM overlays for the
model's top-3 classes and its lowest-scoring class, saved in --save_dir.

    python main.py --model_path vgg16 --conv2d_backcount 1 --images_path data --n_images 3
    python main.py --conv2d_backcount 1 3 4 --images_path data --show

Exit codes: 0 every image processed, 1 some images skipped, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEVICES = ("auto", "cpu", "cuda", "mps")
BATCH_SIZE = 8
TOP = 3


class UsageError(Exception):
    """A mistake on the command line or in its inputs: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise UsageError(f"{message} (see python main.py --help)")


def n_images_type(text: str) -> int | None:
    """A positive integer, or 'all' (returned as None)."""
    if text.lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer or 'all'")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="main.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Grad-CAM heatmaps for a PyTorch CNN's top-3 and lowest-scoring classes.")
    parser.add_argument("--model_path", default=None,
                        help="a torch.save(model) file, a state_dict file (with --arch), a "
                             "torchvision model name (e.g. vgg16), or efficientnet-lite0; "
                             "omitted: the built-in efficientnet-lite0 ImageNet model")
    parser.add_argument("--conv2d_backcount", type=int, nargs="+", default=[1], metavar="N",
                        help="Conv2d layer(s) to explain, counted back from the last one to run "
                             "(1 = last)")
    parser.add_argument("--images_path", default="data",
                        help="ImageFolder root (one subfolder per class), a flat folder of "
                             "images, or one image file")
    parser.add_argument("--save_dir", default="results", help="folder for the figures")
    parser.add_argument("--n_images", type=n_images_type, default=1, metavar="K|all",
                        help="how many images to process, in sorted order")
    parser.add_argument("--imageNet_labels", action="store_true",
                        help="label classes with the bundled imagenet1000_labels.txt")
    parser.add_argument("--labels_path", default=None,
                        help="labels file, a dict literal {0: 'cat', 1: 'dog', ...}; neither this "
                             "nor --imageNet_labels: ImageNet names for 1000 outputs, else "
                             "'class i'")
    parser.add_argument("--show", action="store_true", help="also open each figure in a window")
    parser.add_argument("--arch", default=None,
                        help="architecture of a state_dict file: a torchvision classifier name "
                             "or efficientnet-lite0")
    parser.add_argument("--trust_model", action="store_true",
                        help="allow a model file that needs classes outside torch.nn and "
                             "torchvision; unpickling it runs code from the file")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the model runs; auto: cuda, then mps, then cpu")
    parser.add_argument("--list_layers", action="store_true",
                        help="print the numbered Conv2d layers and exit")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse; --help exits through SystemExit(0) as usual."""
    args = get_args_parser().parse_args(argv)
    if args.imageNet_labels and args.labels_path:
        raise UsageError("give either --imageNet_labels or --labels_path, not both")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit code (0 all processed, 1 some skipped, 2 usage error)."""
    try:
        args = parse_args(argv)
    except UsageError as error:
        print(f"main.py: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help
        return int(done.code or 0)
    from models import ModelError
    from utils import InputError
    try:
        return run(args)
    except (UsageError, ModelError, InputError) as error:
        print(f"main.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("main.py: interrupted", file=sys.stderr)
        return 130


def pick_device(name: str):
    import torch
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if not available[name]:
        raise UsageError(f"--device {name}: not available on this machine; use --device auto")
    return torch.device(name)


def pick_layers(convs: list, backcounts: list[int]) -> list:
    """The target layers for the backcounts (1 = the last Conv2d to run)."""
    if not convs:
        raise UsageError("the model has no Conv2d layer that runs in its forward pass; "
                         "Grad-CAM needs one")
    bad = [b for b in backcounts if not 1 <= b <= len(convs)]
    if bad:
        raise UsageError(f"--conv2d_backcount {bad[0]} is out of range: this model has "
                         f"{len(convs)} Conv2d layers, so use 1..{len(convs)} "
                         f"(--list_layers prints them)")
    return [convs[len(convs) - b] for b in backcounts]


def print_layers(convs: list) -> None:
    width = max(len(c.name) for c in convs)
    print(f"{'backcount':>9}  {'layer':<{width}}  output shape")
    for position, conv in enumerate(convs):
        print(f"{len(convs) - position:>9}  {conv.name:<{width}}  {tuple(conv.output_shape)}")


def choose_labels(args: argparse.Namespace, n_classes: int) -> list[str]:
    from utils import IMAGENET_LABELS_PATH, default_labels, read_labels
    if args.labels_path:
        return read_labels(args.labels_path, n_classes)
    if args.imageNet_labels:
        return read_labels(IMAGENET_LABELS_PATH, n_classes)
    return default_labels(n_classes)


def select_images(entries: list, n_images: int | None) -> list:
    if n_images is not None and n_images > len(entries):
        print(f"warning: --n_images {n_images} but only {len(entries)} images found; "
              f"processing all {len(entries)}", file=sys.stderr)
    return entries if n_images is None else entries[:n_images]


def figure_name(index: int, backcount: int, n_layers: int, n_images: int) -> str:
    """image{i}.jpg for one layer, layer{b}.jpg for several on one image, else both."""
    if n_layers == 1:
        return f"image{index}.jpg"
    if n_images == 1:
        return f"layer{backcount}.jpg"
    return f"image{index}_layer{backcount}.jpg"


def make_save_dir(save_dir: str) -> Path:
    path = Path(save_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--save_dir {save_dir}: cannot create it ({error.strerror})") from None
    return path


def display_available() -> bool:
    import matplotlib
    from matplotlib.backends import BackendFilter, backend_registry
    interactive = backend_registry.list_builtin(BackendFilter.INTERACTIVE)
    return matplotlib.get_backend().lower() in {b.lower() for b in interactive}


def run(args: argparse.Namespace) -> int:
    """Load, discover layers, then explain every selected image; returns the exit code."""
    import torch

    from gradcam import conv_layers_in_run_order
    from models import load_model
    from utils import list_images

    entries = select_images(list_images(args.images_path), args.n_images) \
        if not args.list_layers else []
    device = pick_device(args.device)
    model, preprocessing = load_model(args.model_path, args.arch, args.trust_model)
    model = model.eval().to(device)
    example = torch.zeros(1, 3, preprocessing.crop, preprocessing.crop, device=device)
    try:
        convs, scores = conv_layers_in_run_order(model, example)
    except Exception as error:
        raise UsageError(f"the model fails on a {preprocessing.crop}x{preprocessing.crop} RGB "
                         f"image ({type(error).__name__}: {error})") from None
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise UsageError("the model must return one (batch, classes) tensor of scores; got "
                         f"{type(scores).__name__}")
    if args.list_layers:
        if not convs:
            raise UsageError("the model has no Conv2d layer that runs in its forward pass")
        print_layers(convs)
        return 0
    layers = pick_layers(convs, args.conv2d_backcount)
    labels = choose_labels(args, scores.shape[1])
    save_dir = make_save_dir(args.save_dir)
    return explain_images(model, preprocessing, entries, layers, args.conv2d_backcount, labels,
                          save_dir, device, args.show)


def explain_images(model, preprocessing, entries: list, layers: list, backcounts: list[int],
                   labels: list[str], save_dir: Path, device, show: bool) -> int:
    """Batches of decoded images through the engine, one figure per image and layer."""
    import numpy as np
    import torch

    from gradcam import grad_cam, top_and_lowest
    from utils import FigureWriter, SummaryWriter, load_rgb, panel_titles, prepare_image

    writer = FigureWriter(n_maps=TOP + 1, show=show)
    summary = SummaryWriter(save_dir / "summary.csv", TOP)
    if show and not display_available():
        print("warning: --show: no display available; figures are saved but not shown",
              file=sys.stderr)
        show = False
    processed, skipped = 0, 0
    try:
        for start in range(0, len(entries), BATCH_SIZE):
            batch = []
            for entry in entries[start:start + BATCH_SIZE]:
                try:
                    shown, model_input = prepare_image(load_rgb(entry.path), preprocessing)
                except (OSError, ValueError, SyntaxError) as error:
                    print(f"warning: skipping {entry.path}: not a readable image ({error})",
                          file=sys.stderr)
                    skipped += 1
                    continue
                batch.append((entry, shown, model_input))
            if not batch:
                continue
            images = torch.from_numpy(np.stack([item[2] for item in batch])).to(device)
            scores, maps = grad_cam(model, images, [l.module for l in layers], top_and_lowest)
            classes = top_and_lowest(scores).cpu()
            probabilities = torch.softmax(scores.float(), dim=1).cpu()
            maps = maps.cpu().numpy()
            for b, (entry, shown, _) in enumerate(batch):
                chosen = classes[b].tolist()
                titles = panel_titles(labels, chosen, probabilities[b, chosen].tolist())
                figures = []
                for l, (layer, backcount) in enumerate(zip(layers, backcounts)):
                    writer.draw(shown, maps[l, b], titles, image_title=entry.relative,
                                heading=f"Grad-CAM at {layer.name} (conv2d_backcount {backcount})")
                    figures.append(figure_name(entry.index, backcount, len(layers), len(entries)))
                    writer.save(save_dir / figures[-1])
                    if show:
                        writer.show()
                summary.write(entry, [labels[c] for c in chosen],
                              probabilities[b, chosen].tolist(), figures)
                processed += 1
    finally:
        writer.close()
        summary.close()
    print(f"processed {processed} image(s), skipped {skipped}; figures in {save_dir}")
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
