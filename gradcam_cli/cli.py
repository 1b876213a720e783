"""The command line: its flags, their checks, and ``main``, which runs the tool.

For each image: a figure with the image as the model saw it and Grad-CAM overlays for the
model's top-3 classes and its lowest-scoring class, saved in --save_dir.

    python main.py --model_path vgg16 --conv2d_backcount 1 --images_path data --n_images 3
    gradcam --conv2d_backcount 1 3 4 --images_path data --show

``python main.py`` (the checkout's entry), ``gradcam`` (the installed command) and
``python -m gradcam_cli`` all call ``command_line``.

Exit codes: 0 every image processed, 1 some images skipped, 2 usage error, 3 stopped by a
fault (resume with --skip_existing), 129 SIGHUP, 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import math
import sys

from . import errors, faults
from .errors import InputError, UsageError
from .launch import CPU_BATCH_SIZE, GPU_BATCH_SIZE

DEVICES = ("auto", "cpu", "cuda", "mps")
METHOD_NAMES = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam",
                "eigencam", "ablationcam")
# methods with no gradients, so no counterfactual form (tests check both against the registry)
GRADIENT_FREE = ("scorecam", "eigencam", "ablationcam")
MAX_HELPER_PROCESSES = 64  # per flag: more only crowd the cores (and may be a typo)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except None ones: their help text says what happens instead."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise UsageError(f"{message} (see {self.prog} --help)")


def n_images_type(text: str) -> int | None:
    """A positive integer, or 'all' (returned as None)."""
    if text.lower() == "all":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer or 'all'") from None


def positive_int(text: str) -> int:
    """A positive integer for argparse."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _as_float(text: str) -> float:
    """The number ``text`` spells, or NaN (which every check below refuses)."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


def finite_float(text: str) -> float:
    """A finite float for argparse (a mean)."""
    value = _as_float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    return value


def positive_float(text: str) -> float:
    """A finite float above zero for argparse (a standard deviation)."""
    try:
        value = finite_float(text)
    except argparse.ArgumentTypeError:
        value = 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def probability(text: str) -> float:
    """A number strictly between 0 and 1 for argparse (a threshold)."""
    value = _as_float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability between 0 and 1")
    return value


def non_negative_int(text: str) -> int:
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")


def helper_count(text: str) -> int:
    """A number of helper processes for argparse: 0 to MAX_HELPER_PROCESSES."""
    value = non_negative_int(text)
    if value > MAX_HELPER_PROCESSES:
        raise argparse.ArgumentTypeError(
            f"{text} is more processes than can help (at most {MAX_HELPER_PROCESSES}; the "
            f"defaults are sized to this machine's cores)")
    return value


def get_args_parser(prog: str = "main.py") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog, formatter_class=_HelpFormatter,
        description="Grad-CAM heatmaps for a PyTorch CNN's top-3 and lowest-scoring classes.")
    parser.add_argument("--model_path", default=None,
                        help="a torch.save(model) file, a state_dict file (with --arch), a "
                             "torchvision model name (e.g. vgg16), or efficientnet-lite0; "
                             "omitted: the built-in efficientnet-lite0 ImageNet model")
    parser.add_argument("--conv2d_backcount", type=int, nargs="+", default=None, metavar="N",
                        help="Conv2d layer(s) to explain, counted back from the last one to run "
                             "(1 = last; default: 1)")
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
                        help="architecture of a state_dict file (.pt or .safetensors): a "
                             "torchvision classifier name, timm:NAME for a timm architecture, "
                             "or efficientnet-lite0 (a timm training checkpoint names its own)")
    parser.add_argument("--ema", action="store_true",
                        help="a timm training checkpoint: explain its EMA weights "
                             "(state_dict_ema) instead of its state_dict")
    parser.add_argument("--trust_model", action="store_true",
                        help="allow a model file that needs classes outside torch.nn and "
                             "torchvision; unpickling it runs code from the file")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the model runs; auto: cuda, then mps, then cpu")
    parser.add_argument("--list_layers", action="store_true",
                        help="print every layer with a 4-D or token output in run order "
                             "(Conv2d layers with their backcount, transformer layers with the "
                             "grid they are explained on), then exit")
    parser.add_argument("--batch_size", type=positive_int, default=None,
                        help=f"images per forward pass (default: {CPU_BATCH_SIZE} on CPU and "
                             f"MPS, {GPU_BATCH_SIZE} on CUDA)")
    parser.add_argument("--workers", type=helper_count, default=None,
                        help="processes decoding images while the model runs (default: half the "
                             "cores this process may use, at most 8, and 0 for one image; 0 "
                             "decodes in the main process)")
    parser.add_argument("--render_workers", type=helper_count, default=None,
                        help="processes composing and writing the figures (default: the cores "
                             "left after --workers and the model, at least 1 and at most 8; 0 "
                             "for one image or with --show; 0 draws in the main process)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    parser.add_argument("--save_raw", action="store_true",
                        help="also write save_dir/raw/image{i}.npz: raw maps per layer "
                             "(key layer{b}), classes and probs")
    parser.add_argument("--skip_existing", action="store_true",
                        help="skip images whose outputs all exist (resume an interrupted run)")
    parser.add_argument("--method", choices=METHOD_NAMES, nargs="+", default=["gradcam"],
                        metavar="NAME",
                        help="how maps are made, one or several (a figure each; the gradient "
                             "methods share one forward and backward pass): "
                             + ", ".join(METHOD_NAMES))
    parser.add_argument("--smooth", choices=("aug", "eigen", "aug+eigen"), default=None,
                        help="smooth the maps: aug averages them over flipped and brightened "
                             "copies of each image (6 passes); eigen keeps the first principal "
                             "component of each method's weighted activations; aug+eigen both")
    parser.add_argument("--sanity_check", action="store_true",
                        help="also run the model-parameter randomisation test on the run's "
                             "first images: do the maps change when the weights are "
                             "re-initialised, layer by layer from the output? (writes "
                             "sanity_check.csv and a line at the end)")
    parser.add_argument("--guided", action="store_true",
                        help="add a second row of Guided Grad-CAM maps (guided backpropagation "
                             "times the map)")
    parser.add_argument("--counterfactual", action="store_true",
                        help="negate the gradients: show the regions that argue against each "
                             "class")
    parser.add_argument("--classes", nargs="+", default=None, metavar="C",
                        help="explain these classes (indices or label names) for every image "
                             "instead of top-3 + lowest")
    parser.add_argument("--true_class", action="store_true",
                        help="add a panel for the image's folder class (ImageFolder name "
                             "matched to a label)")
    parser.add_argument("--layer", nargs="+", default=None, metavar="NAME",
                        help="target modules by qualified name (see --list_layers) instead of "
                             "--conv2d_backcount")
    parser.add_argument("--multi_label", action="store_true",
                        help="each class has its own sigmoid probability (a model trained with "
                             "BCEWithLogits on several labels); automatic for Hugging Face "
                             "configs whose problem_type is multi_label_classification; a model "
                             "with one output is always read as binary")
    parser.add_argument("--threshold", type=probability, default=0.5,
                        help="multi-label: a class is shown when its probability is at least "
                             "this; binary: the class is predicted at or above it (accuracy)")
    parser.add_argument("--max_panels", type=positive_int, default=3,
                        help="how many classes get a panel before the lowest one: the top "
                             "ones (multi-label: those at or above --threshold, the most "
                             "probable first)")
    parser.add_argument("--scale", choices=("per-map", "shared"), default="per-map",
                        help="per-map: each map stretched to [0, 1]; shared: one scale for all "
                             "maps of an image and layer, so a weak map looks weak")
    parser.add_argument("--metrics", action="store_true",
                        help="measure each map's faithfulness (deletion/insertion AUC, average "
                             "drop, increase in confidence, ROAD) into summary.csv, beside a "
                             "random and a centred Gaussian map's, and print the means")
    parser.add_argument("--no_report", action="store_true",
                        help="do not write save_dir/report.html (the page to browse the run)")
    preprocessing = parser.add_argument_group(
        "preprocessing", "override how images are prepared (default: the model's own, see "
                         "README 'Preprocessing')")
    preprocessing.add_argument("--resize", type=positive_int, default=None, metavar="N",
                               help="resize the shorter side to N pixels before the crop")
    preprocessing.add_argument("--crop", type=positive_int, default=None, metavar="N",
                               help="centre crop of N x N pixels: the model's input size")
    preprocessing.add_argument("--mean", type=finite_float, nargs=3, default=None,
                               metavar=("R", "G", "B"), help="per-channel mean, on 0..1 pixels")
    preprocessing.add_argument("--std", type=positive_float, nargs=3, default=None,
                               metavar=("R", "G", "B"),
                               help="per-channel standard deviation, on 0..1 pixels")
    return parser


def parse_args(argv: list[str] | None, prog: str = "main.py") -> argparse.Namespace:
    """Parse; --help exits through SystemExit(0) as usual."""
    args = get_args_parser(prog).parse_args(argv)
    if args.imageNet_labels and args.labels_path:
        raise UsageError("give either --imageNet_labels or --labels_path, not both")
    if args.layer and args.conv2d_backcount:
        raise UsageError("give either --layer or --conv2d_backcount, not both")
    without = [m for m in args.method if m in GRADIENT_FREE]
    if args.counterfactual and without:
        raise UsageError(f"--counterfactual needs gradients; {without[0]} has none (leave it "
                         f"out of --method)")
    if args.resize and args.crop and args.resize < args.crop:
        raise UsageError(f"--resize {args.resize} is smaller than --crop {args.crop}: the "
                         f"shorter side is resized first, then the centre crop is cut; give "
                         f"--resize >= --crop")
    args.backcount_given = args.conv2d_backcount is not None
    args.conv2d_backcount = args.conv2d_backcount or [1]
    return args


def main(argv: list[str] | None = None, prog: str = "main.py") -> int:
    """Run the tool; returns the exit code (0 all processed, 1 some skipped, 2 usage error,
    3 stopped by a fault, 129 SIGHUP, 130 Ctrl-C, 143 SIGTERM). ``prog`` is the name the
    user typed (main.py or gradcam): it starts every error line and the resume command."""
    errors.set_program(prog)
    try:
        args = parse_args(argv, prog)
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help
        return int(done.code or 0)
    with faults.stop_signals():  # already while torch loads: a stop then is one line too
        try:
            from .launch import run
            return run(args, faults.resume_command(argv))
        except (KeyboardInterrupt, faults.Terminated) as stop:  # before any image was done
            print(f"{prog}: {faults.describe_stop(stop)}", file=sys.stderr)
            return faults.exit_code_for(stop)
        except InputError as error:  # a usage error, a bad model file, ...
            print(f"{prog}: error: {error}", file=sys.stderr)
            return 2


def command_line(prog: str = "gradcam") -> int:
    """The entry of a process started from a shell: stop signals are ignored outside
    ``main``, which handles them, so the interpreter's shutdown is never cut short. A reader
    that goes away (``--list_layers | head``) ends the output quietly, as other tools do."""
    faults.ignore_stop_signals()
    try:
        code = main(prog=prog)
        sys.stdout.flush()
    except BrokenPipeError:
        code = 0
    if code == 0 and _stdout_closed():
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


def _stdout_closed() -> bool:
    """Whether standard output's reader has gone (a flush fails with a broken pipe)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    return False
