"""Every torchvision classifier, and the Hugging Face and timm families, through the tool, as
a new user would run them.

For each architecture of ``torchvision.models.list_models(module=torchvision.models)``: build it
with random weights (nothing is downloaded; a head that torchvision starts at zero, as in ViT,
gets small random weights so that the maps can show something), ``torch.save`` the whole
model, then run

    python main.py --model_path FILE --n_images 2 --images_path data --save_dir DIR --quiet

with no other flag (no --trust_model). Each model's row says whether the run worked and wrote
its figures, the layer it explained (from summary.csv), whether the top-1 maps have any signal,
and the seconds the run took. Rows are appended to ``--table`` as they finish, so a long run
that is stopped keeps the models done so far.

    python bench/torchvision_zoo.py                       # all, smallest first
    python bench/torchvision_zoo.py --models vit_b_16 swin_t --table zoo.md

``--family huggingface`` saves each common Hugging Face image classifier family (its config's
own sizes, random weights, an image processor of that family) with ``save_pretrained`` and runs
``main.py --model_path FOLDER``; ``--family timm`` writes a timm training checkpoint (what
timm's train.py saves: 'arch', 'state_dict', an argparse.Namespace of arguments) for common
timm architectures and runs ``main.py --model_path FILE``. Neither needs a flag: the tool takes
the preprocessing, labels and default layer from the model's own files.
"""

from __future__ import annotations

import argparse
import csv
import gc
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None,
                        help="architecture names (default: every torchvision classifier)")
    parser.add_argument("--table", default="zoo.md", help="markdown table the rows go to")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per model run")
    parser.add_argument("--family", choices=("torchvision", "huggingface", "timm"),
                        default="torchvision", help="which models (default: torchvision's)")
    return parser.parse_args()


def by_size(names: list[str]) -> list[str]:
    """Smallest first (parameter counts recorded with the DEFAULT weights)."""
    def params(name: str) -> int:
        return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]
    return sorted(names, key=params)


def explained_layer(save_dir: Path) -> tuple[str, str]:
    """(the layer tag of the run, whether some top-1 map has a non-zero peak)."""
    with open(save_dir / "summary.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    peaks = [key for key in rows[0] if key.startswith("top1_peak_")]
    tag = peaks[0][len("top1_peak_"):] if peaks else "?"
    signal = any(float(row[key]) > 0 for row in rows for key in peaks)
    return tag, "yes" if signal else "no"


def torchvision_file(name: str, work: Path) -> Path:
    """A torchvision architecture with random weights, saved whole."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None).eval()
    live_heads(model)
    path = work / f"{name}.pt"
    torch.save(model, path)
    return path


def live_heads(model: torch.nn.Module) -> None:
    """Heads started at zero (torchvision's ViT, some timm models) get small random weights:
    otherwise every map would be zero."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                module.weight.normal_(0.0, 0.02)


# Hugging Face families: the model class, its config's settings (the config's own defaults
# otherwise: base sizes), and the image processor class with the settings its hub
# checkpoints use.
HF_FAMILIES = {
    "vit": ("ViTForImageClassification", "ViTConfig", {}, "ViTImageProcessor", {}),
    "deit": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", {}, "DeiTImageProcessor",
             {}),
    "beit": ("BeitForImageClassification", "BeitConfig", {"use_mean_pooling": True},
             "BeitImageProcessor", {"do_center_crop": False, "size": {"height": 224,
                                                                      "width": 224}}),
    "swin": ("SwinForImageClassification", "SwinConfig", {}, "ViTImageProcessor",
             {"resample": 3}),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig", {},
                 "ConvNextImageProcessor", {"size": {"shortest_edge": 224}, "crop_pct": 0.875}),
    "resnet": ("ResNetForImageClassification", "ResNetConfig", {}, "ConvNextImageProcessor",
               {"size": {"shortest_edge": 224}, "crop_pct": 0.875}),
    "efficientnet": ("EfficientNetForImageClassification", "EfficientNetConfig",
                     {"image_size": 224, "width_coefficient": 1.0, "depth_coefficient": 1.0},
                     "EfficientNetImageProcessor", {"size": {"height": 224, "width": 224}}),
    "mobilevit": ("MobileViTForImageClassification", "MobileViTConfig", {},
                  "MobileViTImageProcessor", {"size": {"shortest_edge": 288}}),
    "regnet": ("RegNetForImageClassification", "RegNetConfig", {}, "ConvNextImageProcessor",
               {"size": {"shortest_edge": 224}, "crop_pct": 0.875}),
    "mobilenet_v2": ("MobileNetV2ForImageClassification", "MobileNetV2Config", {},
                     "MobileNetV2ImageProcessor", {}),
}


def huggingface_folder(name: str, work: Path) -> Path:
    """A Hugging Face family's model with random weights and ten named classes, saved with
    save_pretrained beside its image processor."""
    import transformers
    model_class, config_class, settings, processor_class, processor_settings = \
        HF_FAMILIES[name]
    labels = {i: f"label {i}" for i in range(10)}
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        **settings, num_labels=10, id2label=labels, label2id={v: k for k, v in labels.items()})
    model = getattr(transformers, model_class)(config).eval()
    folder = work / name
    model.save_pretrained(folder)
    getattr(transformers, processor_class)(**processor_settings).save_pretrained(folder)
    return folder


TIMM_MODELS = ["resnet50", "convnext_tiny", "vit_small_patch16_224", "deit_small_patch16_224",
               "swin_tiny_patch4_window7_224", "efficientnet_b0", "mobilenetv3_large_100",
               "regnety_016", "beit_base_patch16_224", "maxvit_tiny_tf_224"]


def timm_checkpoint(name: str, work: Path) -> Path:
    """What timm's train.py saves for a run of ``name`` with 10 classes: a checkpoint dict
    with the architecture, the weights (random) and the run's arguments."""
    import argparse as arguments

    import timm
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    live_heads(model)
    path = work / f"{name}.pth.tar"
    torch.save({"epoch": 1, "arch": name, "state_dict": model.state_dict(), "version": 2,
                "args": arguments.Namespace(model=name, num_classes=10), "metric": 0.0},
               path)
    return path


MAKERS = {"torchvision": torchvision_file, "huggingface": huggingface_folder,
          "timm": timm_checkpoint}


def run_one(name: str, work: Path, timeout: int, family: str = "torchvision"
            ) -> tuple[str, str, str, float]:
    """(status, layer, signal, seconds) for one architecture."""
    path = MAKERS[family](name, work)
    gc.collect()
    save_dir = work / f"out_{name}"
    command = [sys.executable, str(ROOT / "main.py"), "--model_path", str(path),
               "--n_images", "2", "--images_path", str(ROOT / "data"),
               "--save_dir", str(save_dir), "--quiet"]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s", "-", "-", time.perf_counter() - start
    finally:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    figures = sorted(save_dir.glob("*.jpg")) if save_dir.is_dir() else []
    if done.returncode != 0 or len(figures) != 2:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return f"failed (exit {done.returncode}): {last[:120]}", "-", "-", seconds
    layer, signal = explained_layer(save_dir)
    warning = " (warned)" if "warning:" in done.stderr else ""
    return f"ok{warning}", layer, signal, seconds


def main() -> int:
    args = parse_args()
    defaults = {"huggingface": list(HF_FAMILIES), "timm": TIMM_MODELS}
    names = args.models or defaults.get(args.family) or by_size(
        torchvision.models.list_models(module=torchvision.models))
    table = Path(args.table)
    with open(table, "w", encoding="utf-8") as file:
        file.write(f"torch {torch.__version__}, torchvision {torchvision.__version__}\n\n"
                   "| model | status | explained layer | top-1 map non-zero | seconds |\n"
                   "|---|---|---|---|---|\n")
    with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
        for name in names:
            status, layer, signal, seconds = run_one(name, Path(tmp), args.timeout,
                                                     args.family)
            row = f"| {name} | {status} | {layer} | {signal} | {seconds:.1f} |"
            print(row, flush=True)
            with open(table, "a", encoding="utf-8") as file:
                file.write(row + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
