"""The streaming loader against torchvision's ImageFolder and against decoding alone, on ImageNet-like JPEGs.

One run measures, on a generated ILSVRC-layout folder of 500x375 JPEGs (about 70 KB, ``bench/jpeg_tree.py``;
written under /tmp once and reused):

1. per image on one core, in this process, interleaved: JPEG decoding alone (Pillow; torchvision's
   ``decode_image``), torchvision's ImageFolder transforms (Pillow, ``RandomResizedCrop`` + flip +
   ``ToTensor`` + ``Normalize``), ``decode_image`` + ``transforms.v2``, Pillow with the crop as one box resize
   without and with draft-mode DCT downscaling (the last is the toolkit's ``image_stream.decode_crop``):
   the measurement the decoder was chosen by;
2. whole epochs through DataLoaders with 1, 2, ... workers: the toolkit's streaming batches
   (``dataload.train_batches`` on a ``FileSplit``) against ``torchvision.datasets.ImageFolder`` with the same
   transforms, as images/s and images/s per worker;
3. the share of a training step spent waiting for data: the toolkit's streaming batches feeding SGD steps of
   ``--model`` (the time blocked in the iterator over the loop's time).

    python3 bench/loader_bench.py --images 2000 --workers 1 2 --out bench/results/loader_cpu.json
"""
import argparse
import datetime
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataload  # noqa: E402
from bench.bench import command_line, machine  # noqa: E402
from bench.jpeg_tree import write_tree  # noqa: E402
from bench.timing import progress, synchronize  # noqa: E402
from dihkit.sources.image_stream import decode_crop  # noqa: E402
from dihkit.sources.image_trees import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from models_repo import MODELS, build_model  # noqa: E402

CLASSES = 10


def parse_args(argv=None) -> argparse.Namespace:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="generated training images (10 classes)")
    p.add_argument("--tree", type=Path, default=None,
                   help="the generated folder (default /tmp/dih_loader_bench_<images>; made when missing)")
    p.add_argument("--crops", type=int, nargs="+", default=[224, 112], help="crops of the per-image comparison")
    p.add_argument("--per_image", type=int, default=200, help="images of each per-image timing")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (medians over these)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader worker counts to time")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--model", default="res8", choices=list(MODELS), help="the network of the data-wait steps")
    p.add_argument("--steps", type=int, default=12, help="training steps of the data-wait measurement")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if min(args.images, args.per_image, args.repeats, args.batch_size, args.steps, *args.crops) < 1 or min(
            args.workers) < 0:
        p.error("counts must be at least 1 (--workers at least 0)")
    return args


def tree(opts) -> Path:
    """The generated folder: ``--images`` training and a tenth as many validation JPEGs, written once."""
    root = opts.tree or Path(f"/tmp/dih_loader_bench_{opts.images}")
    if not (root / "val").is_dir():
        per_class = -(-opts.images // CLASSES)
        write_tree(root, CLASSES, per_class, max(1, per_class // 10))
    return root


# ----------------------------------------------------------------------------- per image, one core

def anchor_transform(crop: int):
    """torchvision's ImageNet training transforms, as the anchors' ImageFolder loaders use them."""
    from torchvision import transforms
    return transforms.Compose([transforms.RandomResizedCrop(crop), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def per_image_tasks(crop: int) -> dict:
    """Name -> function of a path: one image's work, for each way to decode (and crop) it."""
    anchor = anchor_transform(crop)
    tv = v2.Compose([v2.RandomResizedCrop(crop, antialias=True), v2.RandomHorizontalFlip()])

    def pillow(path):
        with Image.open(path) as image:
            return image.convert("RGB")

    def torchvision_decode(path):
        # Deprecated in torchvision 0.29 (each call warns): measured, not used by the toolkit.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(read_file(path), mode=ImageReadMode.RGB)

    return {"decode_pillow": pillow, "decode_torchvision": torchvision_decode,
            "imagefolder_pillow": lambda path: anchor(pillow(path)),
            "torchvision_v2": lambda path: tv(torchvision_decode(path)),
            "pillow_box": lambda path: decode_crop(path, crop, True, draft=False),
            "pillow_box_draft": lambda path: decode_crop(path, crop, True)}


def time_per_image(files: list, crop: int, repeats: int, loads: list) -> dict:
    """Images/s of every per-image task on one core (this process), medians over interleaved repeats."""
    tasks = per_image_tasks(crop)
    rates = {name: [] for name in tasks}
    for r in range(repeats):
        loads.append(os.getloadavg()[0])
        progress(f"per image, crop {crop}: repeat {r + 1}/{repeats} (load average {loads[-1]:.1f})")
        for name in list(tasks) if r % 2 == 0 else list(tasks)[::-1]:
            start = time.perf_counter()
            for path in files:
                tasks[name](path)
            rates[name].append(len(files) / (time.perf_counter() - start))
    return {name: {"images_per_s": statistics.median(v), "per_repeat": v} for name, v in rates.items()}


# ----------------------------------------------------------------------------- loaders

def timed_epoch(batches) -> dict:
    """Start-up seconds (to the first batch) and steady images/s (after it) of one pass over ``batches``."""
    start = time.perf_counter()
    first, images = None, 0
    for x, *_ in batches:
        if first is None:
            first = time.perf_counter()
        else:
            images += len(x)
    end = time.perf_counter()
    return {"startup_s": first - start, "images_per_s": images / max(end - first, 1e-9)}


def streamed_epoch(data, batch_size: int, workers: int) -> dict:
    """One epoch of the toolkit's streaming batches on the CPU (workers started for the epoch)."""
    return timed_epoch(dataload.train_batches(data.train, data.info, batch_size, torch.device("cpu"),
                                              torch.Generator().manual_seed(0), "stream", workers))


def imagefolder_epoch(root: Path, crop: int, batch_size: int, workers: int) -> dict:
    """One epoch of ``torchvision.datasets.ImageFolder`` (Pillow) with the ImageNet training transforms."""
    from torchvision.datasets import ImageFolder
    loader = torch.utils.data.DataLoader(ImageFolder(str(root / "train"), anchor_transform(crop)),
                                         batch_size=batch_size, shuffle=True, num_workers=workers)
    return timed_epoch(loader)


def time_loaders(opts, root: Path, data, loads: list) -> dict:
    """Both loaders at each ``--workers`` count, interleaved; medians of images/s, and per worker."""
    crop = data.info.image_size
    runs = {f"{kind}/{w}": (lambda w=w: streamed_epoch(data, opts.batch_size, w)) if kind == "stream" else
            (lambda w=w: imagefolder_epoch(root, crop, opts.batch_size, w))
            for w in opts.workers for kind in ("stream", "imagefolder")}
    found = {name: [] for name in runs}
    for r in range(opts.repeats):
        loads.append(os.getloadavg()[0])
        progress(f"loaders: repeat {r + 1}/{opts.repeats} (load average {loads[-1]:.1f})")
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            found[name].append(runs[name]())
    out = {}
    for name, epochs in found.items():
        rate = statistics.median(e["images_per_s"] for e in epochs)
        workers = int(name.split("/")[1])
        out[name] = {"images_per_s": rate, "per_worker": rate / max(workers, 1), "workers": workers,
                     "startup_s": statistics.median(e["startup_s"] for e in epochs),
                     "per_repeat": [e["images_per_s"] for e in epochs]}
    return out


# ----------------------------------------------------------------------------- data wait

def data_wait(opts, data, workers: int) -> dict:
    """SGD steps of ``--model`` fed by the streaming batches: the share of the loop spent waiting for a batch.

    The first step (the loader's start, the allocator) is left out.
    """
    device = torch.device(opts.device)
    model = build_model(opts.model, CLASSES).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = dataload.train_batches(data.train, data.info, opts.batch_size, device, torch.Generator().manual_seed(1),
                                     "stream", workers)
    waited = stepped = 0.0
    steps = 0
    for step in range(min(opts.steps, len(data.train) // opts.batch_size) + 1):
        start = time.perf_counter()
        x, y, _ = next(batches)
        synchronize(device)
        got = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        synchronize(device)
        if step:
            waited, stepped, steps = waited + got - start, stepped + time.perf_counter() - got, steps + 1
    batches.close()
    return {"model": opts.model, "device": str(device), "workers": workers, "steps": steps,
            "wait_s_per_step": waited / steps, "compute_s_per_step": stepped / steps,
            "wait_share": waited / (waited + stepped)}


# ----------------------------------------------------------------------------- report

def ratios(result: dict) -> dict:
    """The figures the docs quote: the streaming loader against ImageFolder, and against decoding alone."""
    out = {}
    tasks = result["per_image"][str(result["loader_crop"])]
    # The limit of a loader that decodes every pixel: the faster full decoder, one core.
    decode = max(tasks["decode_pillow"]["images_per_s"], tasks["decode_torchvision"]["images_per_s"])
    for name, m in result["loaders"].items():
        kind, workers = name.split("/")
        if kind == "stream":
            anchor = result["loaders"][f"imagefolder/{workers}"]["images_per_s"]
            out[f"stream_to_imagefolder/{workers}"] = m["images_per_s"] / anchor
            out[f"stream_per_worker_to_decode_alone/{workers}"] = m["per_worker"] / decode
    return out


def print_report(result: dict) -> None:
    """The tables of the run."""
    print(f"\nload average {result['load_average']['min']:.1f}-{result['load_average']['max']:.1f}, "
          f"{result['machine']['cores']} cores ({result['machine']['cpu']})")
    for crop, tasks in result["per_image"].items():
        print(f"\nper image, one core, crop {crop}:")
        for name, m in tasks.items():
            print(f"  {name:<22}{m['images_per_s']:>8.0f} images/s")
    print(f"\nloaders, crop {result['loader_crop']}, batch {result['settings']['batch_size']}:")
    for name, m in result["loaders"].items():
        print(f"  {name:<16}{m['images_per_s']:>8.0f} images/s {m['per_worker']:>8.0f} per worker"
              f"   start-up {m['startup_s']:.2f} s")
    for name, value in result["ratios"].items():
        print(f"  {name:<40}{value:>7.2f}")
    w = result["data_wait"]
    print(f"\ndata wait: {w['model']} on {w['device']}, {w['workers']} workers: {100 * w['wait_share']:.1f}% of the "
          f"loop ({1000 * w['wait_s_per_step']:.0f} ms waiting, {1000 * w['compute_s_per_step']:.0f} ms computing "
          f"per step)")


def run(opts) -> dict:
    """Generate (or reuse) the folder, time everything, return the record."""
    torch.set_num_threads(opts.threads)
    loads = [os.getloadavg()[0]]
    started = datetime.datetime.now(datetime.timezone.utc)
    root = tree(opts)
    data = dataload.load_data("imagenet", str(root), crop_size=opts.crops[0])
    files = [data.train.path(i) for i in range(min(opts.per_image, len(data.train)))]
    per_image = {str(crop): time_per_image(files, crop, opts.repeats, loads) for crop in opts.crops}
    loaders = time_loaders(opts, root, data, loads)
    progress("data wait")
    wait = data_wait(opts, data, max(opts.workers))
    loads.append(os.getloadavg()[0])
    sizes = [os.path.getsize(f) for f in files]
    result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items() if k != "out"},
              "command": " ".join(sys.argv), "date": started.isoformat(timespec="seconds"), "machine": machine(),
              "tree": {"root": str(root), "train_images": len(data.train), "mean_file_kb": statistics.mean(sizes) / 1e3,
                       "image_size": "500x375"},
              "per_image": per_image, "loader_crop": opts.crops[0], "loaders": loaders, "data_wait": wait,
              "load_average": {"samples_1min": loads, "min": min(loads), "max": max(loads)}}
    result["ratios"] = ratios(result)
    return result


def main(argv=None) -> int:
    """Parse, run, print, and write the JSON."""
    return command_line(argv, parse_args, run, print_report)


if __name__ == "__main__":
    sys.exit(main())
