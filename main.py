"""Grad-CAM from the command line: where does a trained CNN look when it classifies an image?

For each image: a figure with the image as the model saw it and Grad-CAM overlays for the
model's top-3 classes and its lowest-scoring class, saved in --save_dir.

    python main.py --model_path vgg16 --conv2d_backcount 1 --images_path data --n_images 3
    python main.py --conv2d_backcount 1 3 4 --images_path data --show

Exit codes: 0 every image processed, 1 some images skipped, 2 usage error, 3 stopped by a
fault (resume with --skip_existing), 129 SIGHUP, 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import faults

DEVICES = ("auto", "cpu", "cuda", "mps")
METHOD_NAMES = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam")
CPU_BATCH_SIZE = 16
GPU_BATCH_SIZE = 64
MAX_HELPER_PROCESSES = 64  # per flag: more only crowd the cores (and may be a typo)


class UsageError(Exception):
    """A mistake on the command line or in its inputs: one line, exit code 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except None ones: their help text says what happens instead."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise UsageError(f"{message} (see python main.py --help)")


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


def finite_float(text: str) -> float:
    """A finite float for argparse (a mean)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
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


def get_args_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="main.py", formatter_class=_HelpFormatter,
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
                        help="architecture of a state_dict file: a torchvision classifier name "
                             "or efficientnet-lite0")
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
    parser.add_argument("--method", choices=METHOD_NAMES, default="gradcam",
                        help="how maps are made: " + ", ".join(METHOD_NAMES))
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
    parser.add_argument("--scale", choices=("per-map", "shared"), default="per-map",
                        help="per-map: each map stretched to [0, 1]; shared: one scale for all "
                             "maps of an image and layer, so a weak map looks weak")
    parser.add_argument("--metrics", action="store_true",
                        help="measure each map's faithfulness (deletion/insertion AUC, average "
                             "drop, increase in confidence) into summary.csv")
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse; --help exits through SystemExit(0) as usual."""
    args = get_args_parser().parse_args(argv)
    if args.imageNet_labels and args.labels_path:
        raise UsageError("give either --imageNet_labels or --labels_path, not both")
    if args.layer and args.conv2d_backcount:
        raise UsageError("give either --layer or --conv2d_backcount, not both")
    if args.counterfactual and args.method == "scorecam":
        raise UsageError("--counterfactual needs gradients; scorecam has none (pick another "
                         "--method)")
    if args.resize and args.crop and args.resize < args.crop:
        raise UsageError(f"--resize {args.resize} is smaller than --crop {args.crop}: the "
                         f"shorter side is resized first, then the centre crop is cut; give "
                         f"--resize >= --crop")
    args.backcount_given = args.conv2d_backcount is not None
    args.conv2d_backcount = args.conv2d_backcount or [1]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit code (0 all processed, 1 some skipped, 2 usage error,
    3 stopped by a fault, 129 SIGHUP, 130 Ctrl-C, 143 SIGTERM)."""
    try:
        args = parse_args(argv)
    except UsageError as error:
        print(f"main.py: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help
        return int(done.code or 0)
    with faults.stop_signals():  # already while torch loads: a stop then is one line too
        try:
            from utils import InputError  # models.ModelError is one
            return run(args, faults.resume_command(argv))
        except (KeyboardInterrupt, faults.Terminated) as stop:  # before any image was done
            print(f"main.py: {faults.describe_stop(stop)}", file=sys.stderr)
            return faults.exit_code_for(stop)
        except (UsageError, InputError) as error:
            print(f"main.py: error: {error}", file=sys.stderr)
            return 2


def pick_device(name: str, local_rank: int = 0):
    """auto: cuda, then mps, then cpu; under torchrun each process takes its own GPU."""
    import torch
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if name == "auto":
        name = next(kind for kind in ("cuda", "mps", "cpu") if available[kind])
    if not available[name]:
        raise UsageError(f"--device {name}: not available on this machine; use --device auto")
    if name == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def pick_targets(layers: list, backcounts: list[int], names: list[str] | None,
                 backcount_given: bool = True) -> list:
    """The target layers: by --layer name, else by backcount (1 = the last Conv2d to run).

    Without --conv2d_backcount, a transformer whose last Conv2d is its patch embedding is
    explained at ``transformer_default`` instead."""
    from explainer import Target
    from layer_layouts import explainable_near, is_patch_embedding, transformer_default
    if names:
        by_name = {layer.name: layer for layer in layers}
        targets = []
        for name in names:
            if name not in by_name:
                import difflib
                close = difflib.get_close_matches(name, list(by_name), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise UsageError(f"--layer {name}: no module of that name with a 4-D or token "
                                 f"output{hint} (--list_layers prints them)")
            if by_name[name].layout is None:
                raise UsageError(f"--layer {name}: cannot tell which axes of its output "
                                 f"{by_name[name].output_shape} are channels and which the "
                                 f"image grid, so it is not explained; layers that can be: "
                                 f"{', '.join(explainable_near(layers, by_name[name]))} "
                                 f"(--list_layers shows each layer's grid)")
            targets.append(Target(f"layer-{name}", name, by_name[name].module))
        return targets
    convs = [layer for layer in layers if layer.is_conv]
    if not convs:
        raise UsageError("the model has no Conv2d layer that runs in its forward pass; "
                         "Grad-CAM needs one (or name a layer with a 4-D output with --layer)")
    if not backcount_given:
        default = transformer_default(layers)
        if default is not None:
            return [_default_target(default)]
    bad = [b for b in backcounts if not 1 <= b <= len(convs)]
    if bad:
        raise UsageError(f"--conv2d_backcount {bad[0]} is out of range: this model has "
                         f"{len(convs)} Conv2d layers, so use 1..{len(convs)} "
                         f"(--list_layers prints them)")
    for b in backcounts:
        conv = convs[len(convs) - b]
        if backcount_given and is_patch_embedding(layers, conv):
            default = transformer_default(layers)
            better = f"; the default for this model is {default.name}" if default else ""
            print(f"warning: --conv2d_backcount {b} is {conv.name}, the patch embedding that "
                  f"feeds the transformer blocks: its map shows edges, not evidence{better}",
                  file=sys.stderr)
    return [Target(f"layer{b}", convs[len(convs) - b].name, convs[len(convs) - b].module, b)
            for b in backcounts]


def _default_target(layer):
    """A Target for the transformer default layer, described as such in figure headings."""
    from explainer import Target
    return Target(f"layer-{layer.name}", layer.name, layer.module, transformer_default=True)


def print_layers(layers: list, default=None) -> None:
    """Every module with a 4-D or token output in run order; Conv2d layers carry their
    backcount. Layers not laid out as (B, C, H, W) say which grid they are explained on."""
    n_convs = sum(layer.is_conv for layer in layers)
    width = max(len(layer.name) for layer in layers)
    print(f"{'backcount':>9}  {'layer':<{width}}  {'type':<24}  output shape")
    seen = 0
    for layer in layers:
        seen += layer.is_conv
        backcount = str(n_convs - seen + 1) if layer.is_conv else "-"
        kind = type(layer.module).__name__
        line = f"{backcount:>9}  {layer.name:<{width}}  {kind:<24}  {tuple(layer.output_shape)}"
        if layer.layout is None:
            line += "  not explained: channel and grid axes cannot be told apart"
        elif layer.layout.kind != "channels-first":
            line += f"  explained as {layer.layout.describe()}"
        if default is not None and layer.name == default.name:
            line += "  <- default"
        print(line)


def preprocessing_from_flags(base, args: argparse.Namespace):
    """The model's preprocessing with --resize, --crop, --mean and --std applied.

    --crop alone scales the resize with it, keeping the model's resize/crop ratio."""
    from dataclasses import replace
    scaled = base.with_crop(args.crop) if args.crop else base
    crop, resize = scaled.crop, args.resize or scaled.resize
    if resize < crop:
        raise UsageError(f"--resize {resize} is smaller than the crop {crop}: the shorter side "
                         f"is resized first, then a {crop}x{crop} centre crop is cut; give "
                         f"--resize >= --crop")
    return replace(base, resize=resize, crop=crop,
                   mean=tuple(args.mean) if args.mean else base.mean,
                   std=tuple(args.std) if args.std else base.std)


def resolve_classes(names: list[str] | None, labels: list[str]) -> tuple[int, ...] | None:
    """--classes: indices or label names, each checked against the model's classes."""
    if not names:
        return None
    from utils import LabelIndex
    index = LabelIndex(labels)
    found = []
    for name in names:
        if name.lstrip("-").isdecimal() and not 0 <= int(name) < len(labels):
            raise UsageError(f"--classes {name}: out of range; the model has classes "
                             f"0..{len(labels) - 1}")
        class_index = index.find(name, allow_index=True)
        if class_index is None:
            close = index.suggestions(name)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UsageError(f"--classes {name}: not a class index or label name{hint}")
        found.append(class_index)
    return tuple(found)


def choose_labels(args: argparse.Namespace, n_classes: int) -> list[str]:
    from utils import IMAGENET_LABELS_PATH, default_labels, read_labels
    if args.labels_path:
        return read_labels(args.labels_path, n_classes)
    if args.imageNet_labels:
        if n_classes != 1000:
            raise UsageError(f"--imageNet_labels: the model has {n_classes} outputs, not the "
                             f"1000 ImageNet classes; give --labels_path with {n_classes} labels")
        return read_labels(IMAGENET_LABELS_PATH, n_classes)
    return default_labels(n_classes)


def select_images(entries: list, n_images: int | None) -> list:
    if n_images is not None and n_images > len(entries):
        print(f"warning: --n_images {n_images} but only {len(entries)} images found; "
              f"processing all {len(entries)}", file=sys.stderr)
    return entries if n_images is None else entries[:n_images]


def make_save_dir(save_dir: str, save_raw: bool) -> Path:
    """Create --save_dir (and raw/ in it) and check that files can be written there."""
    path = Path(save_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if save_raw:
            (path / "raw").mkdir(exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        try:  # some bytes, not an empty file: a full disk refuses them, not the name
            probe.write_bytes(bytes(64 * 1024))
        finally:
            probe.unlink(missing_ok=True)
    except OSError as error:
        raise UsageError(f"--save_dir {save_dir}: cannot write there "
                         f"({error.strerror or error}); choose another folder") from None
    return path


def default_workers(n_images: int) -> int:
    """Decode processes: half of this process's cores (see ``cores_per_process``), at most 8;
    the model and the render processes share the rest. 0 for a single image, which has
    nothing to decode ahead (a decode process would only cost its start, about 0.1 s)."""
    from torchrun_group import cores_per_process
    if n_images <= 1:
        return 0
    return min(8, cores_per_process() // 2)


def default_render_workers(n_images: int, decode_workers: int) -> int:
    """Render processes: the cores left after decoding and the model, at least 1 and at most
    8; none for a single image, where starting a process costs more than it saves."""
    from torchrun_group import cores_per_process
    if n_images <= 1:
        return 0
    return max(1, min(8, cores_per_process() - 1 - decode_workers))


def run_signature(args: argparse.Namespace, targets: list, options, n_images: int,
                  preprocessing) -> dict:
    """Everything that shapes a run's outputs (the preprocessing too: --resize, --crop, --mean
    and --std change every map); --skip_existing keeps outputs only when it matches the one
    recorded in --save_dir."""
    from dataclasses import asdict
    return {"model": [args.model_path, args.arch], "images": str(args.images_path),
            "preprocessing": asdict(preprocessing),
            "layer_named_files": len(targets) > 1 and n_images == 1,
            "targets": [[t.tag, t.name] for t in targets],
            "labels": [args.labels_path, args.imageNet_labels], "save_raw": args.save_raw,
            "options": {k: v for k, v in asdict(options).items() if k != "score_batch_size"}}


def run(args: argparse.Namespace, resume_command: str = "") -> int:
    """Start the render processes, load, discover layers, then explain every selected image;
    returns the exit code."""
    from render_pool import start_renderer
    from utils import list_images

    entries = select_images(list_images(args.images_path), args.n_images) \
        if not args.list_layers else []
    workers = default_workers(len(entries)) if args.workers is None else args.workers
    render_workers = (default_render_workers(len(entries), workers)
                      if args.render_workers is None else args.render_workers)
    # a render process takes whole images, and costs its start-up (about a second) and memory
    from torchrun_group import images_per_process
    try:
        renderer = start_renderer(min(render_workers, images_per_process(len(entries))),
                                  args.show)
    except OSError as error:  # their queues' locks live in /dev/shm
        raise UsageError(f"cannot start the render processes ({error.strerror or error}): "
                         f"shared memory (/dev/shm) is full or missing; free it, "
                         f"{faults.SHARED_MEMORY_ADVICE}, or draw in this process with "
                         f"--render_workers 0") from None
    try:  # the render processes start while the model loads
        return explain_images(args, entries, workers, renderer, resume_command)
    finally:
        renderer.close(abort=True)


def explain_images(args: argparse.Namespace, entries: list, workers: int, renderer,
                   resume_command: str) -> int:
    """Load, discover layers, then explain ``entries``; returns the exit code."""
    with faults.deferred():  # a stop raised inside torch's import can abort the interpreter
        import torch  # (SIGABRT from C++, once in about 100 Ctrl-Cs there): it waits a second

    from batch_run import RunSettings, finish, run_batches
    from explainer import ExplainOptions
    from gradcam import layers_in_run_order
    from models import load_model
    from torchrun_group import Distributed

    dist = Distributed()
    device = pick_device(args.device, dist.local_rank)
    model, preprocessing = load_model(args.model_path, args.arch, args.trust_model)
    preprocessing = preprocessing_from_flags(preprocessing, args)
    model = model.eval().to(device)
    try:  # an input too big for memory (--crop 100000) fails here too, in one line
        example = torch.zeros(1, 3, preprocessing.crop, preprocessing.crop, device=device)
        layers, scores = layers_in_run_order(model, example)
    except Exception as error:
        raise UsageError(f"the model fails on a {preprocessing.crop}x{preprocessing.crop} RGB "
                         f"image ({type(error).__name__}: {error})") from None
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise UsageError("the model must return one (batch, classes) tensor of scores; got "
                         f"{type(scores).__name__}")
    if args.list_layers:
        if not layers:
            raise UsageError("the model has no layer with a 4-D output to explain")
        from layer_layouts import transformer_default
        print_layers(layers, transformer_default(layers))
        return 0
    targets = pick_targets(layers, args.conv2d_backcount, args.layer, args.backcount_given)
    labels = choose_labels(args, scores.shape[1])
    batch_size = args.batch_size or (GPU_BATCH_SIZE if device.type == "cuda" else
                                     CPU_BATCH_SIZE)
    options = ExplainOptions(
        method=args.method, counterfactual=args.counterfactual, guided=args.guided,
        classes=resolve_classes(args.classes, labels), true_class=args.true_class,
        shared_scale=args.scale == "shared", metrics=args.metrics,
        score_batch_size=batch_size, n_classes=scores.shape[1])
    settings = RunSettings(
        save_dir=make_save_dir(args.save_dir, args.save_raw), tags=[t.tag for t in targets],
        n_selected=len(entries), batch_size=batch_size,
        workers=workers, show=args.show, quiet=args.quiet, save_raw=args.save_raw,
        skip_existing=args.skip_existing, report=not args.no_report,
        signature=run_signature(args, targets, options, len(entries), preprocessing),
        resume_command=resume_command)
    dist.start(device)
    try:
        result = run_batches(model, preprocessing, entries, targets, labels, options,
                             settings, device, dist, renderer)
        total = finish(entries, labels, options, settings, result, dist)
    finally:
        dist.stop()
    if total.stop is not None:
        return faults.exit_code_for(total.stop)
    return 1 if total.unreadable else 0


if __name__ == "__main__":
    faults.ignore_stop_signals()  # main() handles them; the interpreter's shutdown ignores them
    sys.exit(main())
