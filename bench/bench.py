"""Benchmark: our Grad-CAM against plain inference and two peers, and the tool's own pipeline.

Run by hand (never by the tests):  pip install -r requirements-bench.txt
                                    python bench/bench.py [--device cuda] [--baseline DIR]

Every comparison is timed interleaved (A, B, A, B, ...) and reports the median of several
repeats, so machine noise hits both sides alike. Each peer gets its own deep copy of the model:
pytorch-grad-cam leaves its hooks on the model it was given, and they would slow every other
user of that model. Parts:
  a. 4 maps per image (top-3 + lowest) at the last conv layer vs a plain inference forward
  b. the same 4 maps vs pytorch-grad-cam (one GradCAM call per class) and vs Captum's
     LayerGradCam (one call per class, upsampled and normalized as ours are)
  c. 4 classes x 3 layers (backcounts 1, 3, 4) vs a plain inference forward
  r. ROAD's cost per image: --metrics' faithfulness (deletion, insertion, drop, increase) for
     4 maps per image with and without ROAD, resnet50 with random weights (not in the default
     parts: minutes on a CPU)
  m. the five gradient methods (gradcam, gradcam++, xgradcam, layercam, hirescam) in one
     explain_methods call vs gradcam alone, 4 maps at the last conv layer (target <= 1.2x)
  d. end to end: main.py --n_images all with figures vs the usual way (pytorch-grad-cam once
     per class, a new matplotlib subplots figure per image)
  e. peak memory of all of main.py's processes together (main and children, proportional set
     size sampled from /proc) for N and 10 N images
  f. the pipeline with a near-free model (a tiny CNN saved with torch.save): main.py in a fresh
     process over N_small and N_big images; marginal images/s = (N_big - N_small) /
     (t_big - t_small), so start-up is left out. With --baseline DIR (another checkout of the
     tool, e.g. ``git worktree add /tmp/base 7db66bd``) both are timed interleaved, with ratio
  g. the render pool: marginal figures/s of part f's run with --render_workers 1, 2 and 4
     (skipped with a message where main.py has no --render_workers)
  s. start-up: main.py on one image, wall time of a fresh process (with --baseline: both)
  t. throughput as a user sees it (not in the default parts: minutes on a CPU): main.py with
     the built-in model and default flags over N_big images in a fresh process, images/s over
     the wall time (start-up included) and marginal images/s against N_small images, after
     one untimed run of each checkout; with --baseline both, interleaved. The target on a GPU
     machine: >= 600 images/s over >= 2,000.
"""

from __future__ import annotations

import argparse
import copy
import os
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

from gradcam_cli import cli  # noqa: E402
from gradcam_cli.gradcam import (  # noqa: E402
    conv_layers_in_run_order,
    explain_methods,
    grad_cam,
    top_and_lowest,
)
from gradcam_cli.images import list_images, load_rgb  # noqa: E402
from gradcam_cli.models import BUILTIN_MODEL, load_model  # noqa: E402
from gradcam_cli.preprocessing import IMAGENET_PREPROCESSING, prepare_image  # noqa: E402


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
    parser.add_argument("--pipeline_images", type=int, nargs=2, default=[32, 288],
                        metavar=("N_SMALL", "N_BIG"), help="part f and g's two run sizes")
    parser.add_argument("--pipeline_repeats", type=int, default=3)
    parser.add_argument("--render_workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--startup_repeats", type=int, default=7)
    parser.add_argument("--throughput_images", type=int, nargs=2, default=[64, 2048],
                        metavar=("N_SMALL", "N_BIG"), help="part t's two run sizes")
    parser.add_argument("--throughput_repeats", type=int, default=1)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout of the tool, timed beside this one (e, f, s)")
    parser.add_argument("--parts", default="abcmdefgs")
    return parser


GRADIENT_METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"]

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
        loaded_model = load_model(None)
        model, preprocessing = loaded_model.model, loaded_model.preprocessing
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


def captum_maps(cam, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The same 4 maps with Captum's LayerGradCam: one call per class, then upsampled and
    min-max normalized per map, as ours are."""
    from captum.attr import LayerAttribution
    maps = []
    for k in range(classes.shape[1]):
        attribution = cam.attribute(images, target=classes[:, k], relu_attributions=True)
        upsampled = LayerAttribution.interpolate(attribution, tuple(images.shape[-2:]),
                                                 interpolate_mode="bilinear")[:, 0]
        low = upsampled.amin(dim=(1, 2), keepdim=True)
        high = upsampled.amax(dim=(1, 2), keepdim=True)
        maps.append((upsampled - low) / (high - low).clamp_min(1e-12))
    return torch.stack(maps, dim=1)


def peer_copy(model: torch.nn.Module, layer_name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A deep copy of the model for one peer, and the copy's module of that name: a peer's
    hooks stay on its own copy and never slow the others."""
    duplicate = copy.deepcopy(model)
    return duplicate, dict(duplicate.named_modules())[layer_name]


# ----------------------------------------------------------------------------- parts a-c

def engine_parts(name: str, args, device: torch.device) -> list[str]:
    model, preprocessing = bench_model(name, device)
    images = image_batch(preprocessing, args.batch_size, device)
    convs, _ = conv_layers_in_run_order(model, images[:1])
    last = [convs[-1].module]
    three = [convs[len(convs) - b].module for b in (1, 3, 4)]
    with torch.no_grad():  # not inference_mode: Captum's autograd takes these classes in
        classes = top_and_lowest(model(images))

    def plain():
        with torch.inference_mode():
            model(images)

    functions = {"plain": plain,
                 "ours": lambda: grad_cam(model, images, last, top_and_lowest),
                 "ours_3_layers": lambda: grad_cam(model, images, three, top_and_lowest)}
    if "m" in args.parts:
        functions["ours_5_methods"] = lambda: explain_methods(
            model, images, last, top_and_lowest, GRADIENT_METHODS)
    if "b" in args.parts:
        from captum.attr import LayerGradCam
        from pytorch_grad_cam import GradCAM
        pgc_model, pgc_layer = peer_copy(model, convs[-1].name)
        pgc = GradCAM(model=pgc_model, target_layers=[pgc_layer])
        functions["pytorch_grad_cam"] = lambda: pytorch_grad_cam_maps(pgc, images, classes)
        captum_model, captum_layer = peer_copy(model, convs[-1].name)
        captum = LayerGradCam(captum_model, captum_layer)
        functions["captum"] = lambda: captum_maps(captum, images, classes)
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
        rows.append(f"| b | {name} | Captum LayerGradCam / ours, 4 maps | "
                    f"{per_image['captum']:.1f} / {per_image['ours']:.1f} ms/img | "
                    f"**{t['captum'] / t['ours']:.1f}x faster** | faster |")
    if "m" in args.parts:
        rows.append(f"| m | {name} | 5 gradient methods / gradcam alone, 4 maps | "
                    f"{per_image['ours_5_methods']:.1f} / {per_image['ours']:.1f} ms/img | "
                    f"**{t['ours_5_methods'] / t['ours']:.2f}x** | <= 1.2x |")
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
    from gradcam_cli.labels import default_labels
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


# ----------------------------------------------------------------------------- processes

def checkouts(args) -> dict[str, Path]:
    """This checkout as "main.py", and the --baseline checkout as "baseline" where given."""
    return {"main.py": ROOT, **({"baseline": args.baseline} if args.baseline else {})}


def cli_command(checkout: Path, args: list[str]) -> list[str]:
    return [sys.executable, str(checkout / "main.py")] + args


def cli_env() -> dict[str, str]:
    return dict(os.environ, MPLBACKEND="Agg")


def timed_run(command: list[str], save_dir: Path) -> float:
    """Wall seconds of one fresh process, into an empty ``save_dir``."""
    shutil.rmtree(save_dir, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env=cli_env(), stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it, from /proc/PID/task/TID/children."""
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        found.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                queue += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def memory_kib(pid: int) -> int:
    """A process's proportional set size (shared pages split between their users), or its
    resident set size where smaps_rollup cannot be read; 0 once it is gone."""
    for path, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1])
        except (OSError, ValueError):
            continue
    return 0


def peak_tree_memory_mib(command: list[str], interval: float = 0.05) -> float:
    """Peak over time of the summed memory of a command's whole process tree, in MiB."""
    process = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL)
    peak = 0
    while process.poll() is None:
        peak = max(peak, sum(memory_kib(pid) for pid in process_tree(process.pid)))
        time.sleep(interval)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}")
    return peak / 1024.0


# ----------------------------------------------------------------------------- part e

def memory_part(args, device: torch.device, workdir: Path) -> list[str]:
    small, large = args.memory_images, args.memory_images * 10
    folders = {small: copy_images(workdir / "small", small),
               large: copy_images(workdir / "large", large)}
    rows = []
    for label, checkout in checkouts(args).items():
        peaks = {}
        for count, folder in folders.items():
            shutil.rmtree(workdir / "out", ignore_errors=True)
            peaks[count] = peak_tree_memory_mib(cli_command(checkout, [
                "--images_path", str(folder), "--n_images", "all", "--quiet",
                "--save_dir", str(workdir / "out"), "--device", device.type]))
        rows.append(f"| e | {BUILTIN_MODEL} | {label}: peak memory of all processes (PSS), "
                    f"{small} / {large} images | {peaks[small]:.0f} / {peaks[large]:.0f} MiB | "
                    f"**{peaks[large] / peaks[small]:.2f}x** | <= 1.1x |")
        print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------- parts f, g

def tiny_model_file(workdir: Path) -> Path:
    """A near-free CNN (a few thousand multiply-adds per pixel) with 1000 ImageNet outputs,
    saved whole with torch.save, so main.py's own costs are what gets measured."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 1000)).eval()
    path = workdir / "tiny.pt"
    torch.save(model, path)
    return path


def marginal_rates(runs: dict[str, list[str]], args, device: torch.device,
                   workdir: Path) -> dict[str, float]:
    """Marginal images/s of each named main.py command (its extra arguments), every command
    timed over N_small and N_big images, interleaved, the median of the repeats."""
    n_small, n_big = args.pipeline_images
    folders = {n: workdir / f"images{n}" for n in (n_small, n_big)}
    for n, folder in folders.items():
        if not folder.exists():
            copy_images(folder, n)
    model = tiny_model_file(workdir)
    times = {(name, n): [] for name in runs for n in folders}
    for _ in range(args.pipeline_repeats):
        for n, folder in folders.items():
            for name, command in runs.items():
                extra = ["--model_path", str(model), "--images_path", str(folder),
                         "--n_images", "all", "--quiet", "--device", device.type]
                times[(name, n)].append(timed_run(command + extra, workdir / "out"))
    median = {key: statistics.median(values) for key, values in times.items()}
    return {name: (n_big - n_small) / (median[(name, n_big)] - median[(name, n_small)])
            for name in runs}


def pipeline_part(args, device: torch.device, workdir: Path) -> list[str]:
    n_small, n_big = args.pipeline_images
    runs = {name: cli_command(checkout, []) for name, checkout in checkouts(args).items()}
    rates = marginal_rates(runs, args, device, workdir)
    what = f"pipeline, tiny CNN, marginal over {n_small} -> {n_big} images"
    if args.baseline:
        return [f"| f | tiny CNN | {what}: main.py / baseline ({args.baseline}) | "
                f"{rates['main.py']:.1f} / {rates['baseline']:.1f} images/s | "
                f"**{rates['main.py'] / rates['baseline']:.2f}x** | >= 2x |"]
    return [f"| f | tiny CNN | {what} | {rates['main.py']:.1f} images/s | | |"]


def has_flag(checkout: Path, flag: str) -> bool:
    help_text = subprocess.run(cli_command(checkout, ["--help"]), env=cli_env(), check=True,
                               capture_output=True, text=True).stdout
    return flag in help_text


def render_pool_part(args, device: torch.device, workdir: Path) -> list[str]:
    if not has_flag(ROOT, "--render_workers"):
        print("part g skipped: this main.py has no --render_workers (the render pool)",
              flush=True)
        return []
    runs = {w: cli_command(ROOT, ["--render_workers", str(w)]) for w in args.render_workers}
    rates = marginal_rates(runs, args, device, workdir)
    first = args.render_workers[0]
    return [f"| g | tiny CNN | render pool, --render_workers {w}: figures/s (1 per image) | "
            f"{rates[w]:.1f} figures/s | **{rates[w] / rates[first]:.2f}x** of {first} | "
            f"grows with workers |" for w in args.render_workers]


# ----------------------------------------------------------------------------- part t

def throughput_part(args, device: torch.device, workdir: Path) -> list[str]:
    """main.py with the built-in model and default flags over N_small and N_big images, each
    in a fresh process, as a user runs it; the checkouts interleaved."""
    n_small, n_big = args.throughput_images
    if not 0 < n_small < n_big:
        raise SystemExit(f"--throughput_images {n_small} {n_big}: give N_SMALL < N_BIG")
    folders = {n: copy_images(workdir / f"images{n}", n) for n in (n_small, n_big)}
    times = {(name, n): [] for name in checkouts(args) for n in folders}

    def seconds(checkout: Path, folder: Path) -> float:
        return timed_run(cli_command(checkout, [
            "--images_path", str(folder), "--n_images", "all", "--quiet",
            "--device", device.type, "--save_dir", str(workdir / "out")]), workdir / "out")

    for checkout in checkouts(args).values():  # untimed: file cache, CUDA libraries
        seconds(checkout, folders[n_small])
    for _ in range(args.throughput_repeats):
        for n, folder in folders.items():
            for name, checkout in checkouts(args).items():
                times[(name, n)].append(seconds(checkout, folder))
    wall, marginal = {}, {}
    for name in checkouts(args):
        big, small = (statistics.median(times[(name, n)]) for n in (n_big, n_small))
        wall[name], marginal[name] = n_big / big, (n_big - n_small) / (big - small)
    what = (f"--n_images all over {n_big} images: wall (start-up included) / marginal over "
            f"{n_small} -> {n_big}")
    rows = [f"| t | {BUILTIN_MODEL} | {name}, {what} | {wall[name]:.1f} / "
            f"{marginal[name]:.1f} images/s | | >= 600 images/s (GPU, 8+ cores) |"
            for name in checkouts(args)]
    if args.baseline:
        rows.append(f"| t | {BUILTIN_MODEL} | main.py / baseline, wall and marginal | | "
                    f"**{wall['main.py'] / wall['baseline']:.2f}x / "
                    f"{marginal['main.py'] / marginal['baseline']:.2f}x** | >= 10x on a GPU "
                    f"(64 -> 600 images/s) |")
    return rows


# ----------------------------------------------------------------------------- part r

def road_part(args, device: torch.device, workdir: Path) -> list[str]:
    """Seconds per image of faithfulness for 4 maps, without and with ROAD (interleaved)."""
    from gradcam_cli.metrics import faithfulness, random_maps
    model, preprocessing = bench_model("resnet50", device)
    images = image_batch(preprocessing, args.batch_size, device)
    maps = random_maps((args.batch_size, 4, *images.shape[-2:]),
                       torch.Generator().manual_seed(1)).to(device)
    classes = torch.arange(args.batch_size * 4, device=device).view(args.batch_size, 4) % 1000
    functions = {
        "without": lambda: faithfulness(model, images, maps, classes, batch_size=64),
        "with": lambda: faithfulness(model, images, maps, classes, batch_size=64, road=True,
                                     generator=torch.Generator().manual_seed(0))}
    t = interleaved(functions, max(1, args.repeats // 2), device)
    per_image = {k: v / args.batch_size for k, v in t.items()}
    return [f"| r | resnet50 | faithfulness of 4 maps per image, with / without ROAD | "
            f"{per_image['with']:.2f} / {per_image['without']:.2f} s/img "
            f"(ROAD {per_image['with'] - per_image['without']:.2f} s) | "
            f"**{t['with'] / t['without']:.2f}x** | |"]


# ----------------------------------------------------------------------------- part s

def startup_part(args, device: torch.device, workdir: Path) -> list[str]:
    """main.py on one image, fresh processes, interleaved with the baseline."""
    image = ROOT / "data" / "tabby" / "chelsea.png"
    times = {name: [] for name in checkouts(args)}
    for _ in range(args.startup_repeats):
        for name, checkout in checkouts(args).items():
            command = cli_command(checkout, ["--images_path", str(image), "--quiet",
                                             "--device", device.type,
                                             "--save_dir", str(workdir / "out")])
            times[name].append(timed_run(command, workdir / "out"))
    cells = {name: f"{statistics.median(t):.2f} s (min {min(t):.2f})"
             for name, t in times.items()}
    if args.baseline:
        ratio = statistics.median(times["baseline"]) / statistics.median(times["main.py"])
        return [f"| s | {BUILTIN_MODEL} | start-up, one image: baseline / main.py | "
                f"{cells['baseline']} / {cells['main.py']} | **{ratio:.2f}x faster** | "
                f"no slower |"]
    return [f"| s | {BUILTIN_MODEL} | start-up, one image | {cells['main.py']} | | |"]


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    if args.baseline and not (args.baseline / "main.py").is_file():
        print(f"error: --baseline {args.baseline}: no main.py there; give a checkout of the "
              f"tool", file=sys.stderr)
        return 2
    print(f"device: {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, batch {args.batch_size}, median of {args.repeats}",
          flush=True)
    rows = ["| part | model | what | measured | ratio | target |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if set("abcm") & set(args.parts):
                added = engine_parts(name, args, device)
                rows += added
                print("\n".join(added), flush=True)
            if "d" in args.parts:
                rows += end_to_end(name, args, device, Path(tmp) / name)
                print(rows[-1], flush=True)
        later = (("s", startup_part), ("f", pipeline_part), ("g", render_pool_part),
                 ("t", throughput_part), ("r", road_part), ("e", memory_part))
        for part, function in later:
            if part in args.parts:
                added = function(args, device, Path(tmp) / f"part_{part}")
                rows += added
                if part != "e":
                    print("\n".join(added), flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
