"""One run of the command line, from its parsed arguments: the images to explain, the helper
processes, the model and its layers, the labels and options, then the batch run itself."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import faults
from .errors import UsageError

CPU_BATCH_SIZE = 16  # the defaults of --batch_size
GPU_BATCH_SIZE = 64


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
    from .labels import LabelIndex
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


def choose_labels(args: argparse.Namespace, n_classes: int,
                  from_model: list[str] | None = None) -> list[str]:
    """The class names: --labels_path, --imageNet_labels, the model's own (a Hugging Face
    config's id2label), else the defaults. A binary model (one output) gets two names: what
    argues against its class, then its class (``labels.binary_labels``)."""
    from .labels import IMAGENET_LABELS_PATH, binary_labels, default_labels, read_labels
    if args.labels_path:
        return read_labels(args.labels_path, n_classes)
    if args.imageNet_labels:
        if n_classes != 1000:
            raise UsageError(f"--imageNet_labels: the model has {n_classes} outputs, not the "
                             f"1000 ImageNet classes; give --labels_path with {n_classes} labels")
        return read_labels(IMAGENET_LABELS_PATH, n_classes)
    if from_model is not None and len(from_model) == n_classes:
        return binary_labels(from_model) if n_classes == 1 else list(from_model)
    return default_labels(n_classes)


def sanity_check_of(model, preprocessing, targets: list, plan, device, result):
    """--sanity_check once every image is done: its summary, or None. A stop signal during
    it stops the run as one during the images would (the resume command redoes only the
    check); a failure of the check itself is a warning, as the run's outputs are written."""
    from .sanity_run import run_sanity_check
    try:
        return run_sanity_check(model, preprocessing, targets, plan, device)
    except (KeyboardInterrupt, faults.Terminated) as stop:
        result.stop = stop
    except Exception as error:
        print(f"warning: the sanity check failed ({type(error).__name__}: {error}); the "
              f"run's outputs are complete", file=sys.stderr)
    return None


def pick_head(n_outputs: int, multi_label: bool) -> str:
    """How the scores read as probabilities: one output is a binary model (sigmoid), a
    multi-label model has a sigmoid per class, any other a softmax over its classes."""
    if n_outputs == 1:
        return "binary"
    return "sigmoid" if multi_label else "softmax"


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
    from .torchrun_group import cores_per_process
    if n_images <= 1:
        return 0
    return min(8, cores_per_process() // 2)


def default_render_workers(n_images: int, decode_workers: int) -> int:
    """Render processes: the cores left after decoding and the model, at least 1 and at most
    8; none for a single image, where starting a process costs more than it saves."""
    from .torchrun_group import cores_per_process
    if n_images <= 1:
        return 0
    return max(1, min(8, cores_per_process() - 1 - decode_workers))


def run_signature(args: argparse.Namespace, targets: list, options, n_images: int,
                  preprocessing) -> dict:
    """Everything that shapes a run's outputs (the preprocessing too: --resize, --crop, --mean
    and --std change every map); --skip_existing keeps outputs only when it matches the one
    recorded in --save_dir."""
    from dataclasses import asdict

    from .targets import views_of
    return {"model": [args.model_path, args.arch], "images": str(args.images_path),
            "preprocessing": asdict(preprocessing),
            "layer_named_files": len(targets) * len(options.methods) > 1 and n_images == 1,
            "targets": [[v.tag, v.caption(len(options.methods)), v.method]
                        for v in views_of(targets, options.methods)],
            "labels": [args.labels_path, args.imageNet_labels], "save_raw": args.save_raw,
            "options": {k: v for k, v in asdict(options).items() if k != "score_batch_size"}}


def run(args: argparse.Namespace, resume_command: str = "") -> int:
    """Start the render processes, load, discover layers, then explain every selected image;
    returns the exit code."""
    from .images import list_images
    from .render_pool import start_renderer

    entries = select_images(list_images(args.images_path), args.n_images) \
        if not args.list_layers else []
    workers = default_workers(len(entries)) if args.workers is None else args.workers
    render_workers = (default_render_workers(len(entries), workers)
                      if args.render_workers is None else args.render_workers)
    # a render process takes whole images, and costs its start-up (about a second) and memory
    from .torchrun_group import images_per_process
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

    from .batch_run import BatchRun
    from .gradcam import layers_in_run_order
    from .heads import OutputError
    from .models import SizeError, load_model
    from .settings import ExplainOptions, RunPlan, RunSettings
    from .summary import finish
    from .targets import pick_targets, print_layers, views_of
    from .torchrun_group import Distributed

    dist = Distributed()
    device = pick_device(args.device, dist.local_rank)
    try:
        loaded = load_model(args.model_path, args.arch, args.trust_model, args.ema)
    except SizeError as error:  # a processor's size this tool cannot copy: the flags give it
        if error.loaded is None or not (args.resize and args.crop):
            raise
        loaded = error.loaded
    preprocessing = preprocessing_from_flags(loaded.preprocessing, args)
    model = loaded.model.eval().to(device)
    try:  # an input too big for memory (--crop 100000) fails here too, in one line
        example = torch.zeros(1, 3, preprocessing.crop, preprocessing.crop, device=device)
        layers, scores = layers_in_run_order(model, example)
    except OutputError as error:
        raise UsageError(str(error)) from None
    except Exception as error:
        raise UsageError(f"the model fails on a {preprocessing.crop}x{preprocessing.crop} RGB "
                         f"image ({type(error).__name__}: {error})") from None
    if args.list_layers:
        if not layers:
            raise UsageError("the model has no layer with a 4-D output to explain")
        from .layer_layouts import transformer_default
        print_layers(layers, transformer_default(layers))
        return 0
    targets = pick_targets(layers, args.conv2d_backcount, args.layer, args.backcount_given)
    labels = choose_labels(args, scores.shape[1], loaded.labels)
    head = pick_head(scores.shape[1], args.multi_label or loaded.multi_label)
    if head == "binary" and args.counterfactual and not args.classes:
        raise UsageError("--counterfactual: this model has one output (binary), and its figure "
                         "already shows the map against its class beside the map for it")
    batch_size = args.batch_size or (GPU_BATCH_SIZE if device.type == "cuda" else
                                     CPU_BATCH_SIZE)
    options = ExplainOptions(
        methods=tuple(dict.fromkeys(args.method)), counterfactual=args.counterfactual,
        guided=args.guided, smooth=args.smooth,
        classes=resolve_classes(args.classes, labels), true_class=args.true_class,
        shared_scale=args.scale == "shared", metrics=args.metrics,
        score_batch_size=batch_size, n_classes=len(labels), head=head,
        threshold=args.threshold, max_panels=args.max_panels)
    settings = RunSettings(
        save_dir=make_save_dir(args.save_dir, args.save_raw),
        tags=[v.tag for v in views_of(targets, options.methods)],
        n_selected=len(entries), batch_size=batch_size,
        workers=workers, show=args.show, quiet=args.quiet, save_raw=args.save_raw,
        skip_existing=args.skip_existing, report=not args.no_report,
        signature=run_signature(args, targets, options, len(entries), preprocessing),
        resume_command=resume_command)
    plan = RunPlan(entries, labels, options, settings, dist)
    dist.start(device)
    try:
        result = BatchRun(model, preprocessing, targets, plan, device, renderer).run()
        sanity = None
        if args.sanity_check and result.stop is None and dist.leader:
            sanity = sanity_check_of(model, preprocessing, targets, plan, device, result)
        total = finish(plan, result, sanity)
    finally:
        dist.stop()
    if total.stop is not None:
        return faults.exit_code_for(total.stop)
    return 1 if total.unreadable else 0
