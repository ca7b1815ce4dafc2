"""The streaming data path on a generated ILSVRC-2012-layout folder (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``).

10 classes of 24 training and 6 validation JPEGs of mixed sizes (with a greyscale JPEG, a CMYK JPEG and a PNG
under a .JPEG name, as real ImageNet holds), trained at 16 px crops. The crops against torchvision's own
transforms; the listing, the memory budget and the refusals; an epoch the same with any number of workers
and after a skip; the ranks' disjoint shares; an unreadable file named; the pipeline teacher -> heads -> DIH
(every distilling type in the full suite); resume after a kill at an epoch boundary and mid-epoch; under
torchrun, disjoint shares and the single-process evaluation (full suite); peak memory flat in the image count.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torchvision import transforms

import dataload
from bench.jpeg_tree import picture, wnid, write_tree
from console import ROOT, run_inprocess
from dihkit.runs import run_state
from dihkit.sources.image_stream import decode_crop, eval_resize, seeded, train_box
from faults import kill_after_first_epoch, make_imagefolder
from test_distributed import evaluate_inprocess, free_port, torchrun
from test_resume import assert_bit_identical, collect, in_background

SIZES = ((40, 30), (64, 48), (30, 52), (96, 72), (57, 57))
CROP = 16
STREAM = ["--dataset", "imagenet", "--crop_size", CROP, "--train_subset", "0", "--gpu_id", "cpu", "--num_workers", "0",
          "--batch_size", "32", "--epochs", "1", "--schedule", "1", "--seed", "3", "--teacher", "res8",
          "--student", "res8"]
DISTILLING = ["dkd", "dist", "fitnets", "takd", "at", "crd", "tofd", "mhkd"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """The generated ILSVRC-layout folder (read-only for the tests)."""
    return write_tree(tmp_path_factory.mktemp("ilsvrc") / "imagenet", 10, 24, 6, sizes=SIZES, odd=True)


def photo(path, size, kind="PNG"):
    """One generated picture of ``size`` saved at ``path``; returns it as an RGB image."""
    image = picture(*size, np.zeros(3, np.float32), np.random.default_rng(sum(size)))
    image.save(path, kind, quality=90)
    return image


# ----------------------------------------------------------------------------- crops

@pytest.mark.parametrize("size, crop", [((57, 41), 16), ((40, 64), 24), ((500, 375), 224)])
def test_evaluation_crop_is_imagefolders_resize_then_centre_crop(tmp_path, size, crop):
    image = photo(tmp_path / "x.png", size)
    want = np.asarray(transforms.CenterCrop(crop)(transforms.Resize(eval_resize(crop))(image)))
    got = decode_crop(str(tmp_path / "x.png"), crop, train=False)
    assert eval_resize(224) == 256 and got.shape == (crop, crop, 3) and got.dtype == np.uint8
    # One box resize samples the points of the resized-then-cropped image: equal up to fixed-point rounding.
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_training_crop_draws_as_imagefolders_random_resized_crop(tmp_path):
    image = photo(tmp_path / "x.png", (57, 41))
    reference = transforms.Compose([transforms.RandomResizedCrop(CROP), transforms.RandomHorizontalFlip()])
    gaps, boxes = [], set()
    for index in range(20):
        with seeded(7, index):
            want = np.asarray(reference(image))
        with seeded(7, index):
            boxes.add(train_box(image))
        with seeded(7, index):
            got = decode_crop(str(tmp_path / "x.png"), CROP, train=True)
        gaps.append(np.abs(got.astype(int) - want.astype(int)).mean())
    # The same boxes and flips in the same order (a box or flip drawn otherwise differs by tens of levels);
    # only the border pixels' filter differs (the box resize reads past the box, a crop cannot).
    assert len(boxes) == 20 and max(gaps) < 3


def test_draft_decoding_keeps_the_crop(tmp_path):
    photo(tmp_path / "x.JPEG", (500, 375), "JPEG")
    gaps = []
    for index in range(10):
        with seeded(3, index):
            full = decode_crop(str(tmp_path / "x.JPEG"), 32, True, draft=False)
        with seeded(3, index):
            reduced = decode_crop(str(tmp_path / "x.JPEG"), 32, True)
        gaps.append(np.abs(full.astype(int) - reduced.astype(int)).mean())
    # DCT-domain downscaling changes the filter, not the place: a misplaced box differs by tens of levels.
    assert max(gaps) < 4


# ----------------------------------------------------------------------------- listing and the choice

def test_imagenet_folder_is_listed_by_sorted_wnid_and_streamed(tree):
    data = dataload.load_data("imagenet", str(tree), crop_size=CROP)
    assert data.streamed and "imagenet is always streamed" in data.held
    assert data.info.classes == tuple(wnid(c) for c in range(10)) and data.info.image_size == CROP
    assert data.info.mean == (0.485, 0.456, 0.406) and (len(data.train), len(data.test)) == (240, 60)
    assert torch.equal(data.train.labels, torch.arange(10).repeat_interleave(24))
    for i in (0, 239):
        path = data.train.path(i)
        assert os.path.isfile(path) and f"/train/{wnid(int(data.train.labels[i]))}/" in path
    assert data.test.path(59).startswith(str(tree / "val" / wnid(9)))


def test_validation_carving_and_subset_work_on_files(tree):
    data = dataload.load_data("imagenet", str(tree), val_size=20, train_subset=100, crop_size=CROP)
    assert isinstance(data.val, dataload.FileSplit) and len(data.val) == 20 and len(data.train) == 100
    assert torch.bincount(data.val.labels).tolist() == [2] * 10 == (torch.bincount(data.train.labels) // 5).tolist()
    assert not set(data.val.files.tolist()) & set(data.train.files.tolist())
    again = dataload.load_data("imagenet", str(tree), val_size=20, train_subset=100, crop_size=CROP)
    assert dataload.data_fingerprint(again) == dataload.data_fingerprint(data)
    other_crop = dataload.load_data("imagenet", str(tree), val_size=20, train_subset=100, crop_size=24)
    assert dataload.data_fingerprint(other_crop) != dataload.data_fingerprint(data)


def test_memory_budget_chooses_between_memory_and_stream(tmp_path):
    folder = make_imagefolder(tmp_path / "folder", train_per_class=4, test_per_class=2, size=16, classes=3)
    size = 18 * 3 * 16 * 16
    held = dataload.load_data("imagefolder", str(folder), budget=dataload.MemoryBudget(size, "test"))
    streamed = dataload.load_data("imagefolder", str(folder), budget=dataload.MemoryBudget(size - 1, "test"))
    assert not held.streamed and "18 images of 16x16" in held.held and "within the memory budget" in held.held
    assert streamed.streamed and "over the memory budget of 0.00 GB: test" in streamed.held
    # A streamed folder's crop defaults to its first image's shorter side (at most 224).
    assert streamed.info.image_size == 16 and held.info.image_size == 16
    assert dataload.load_data("imagefolder", str(folder), stream="yes").streamed
    assert not dataload.load_data("imagefolder", str(folder), stream="no", budget=dataload.MemoryBudget(0, "x")).streamed


@pytest.mark.parametrize("crop, first_map", [(64, "[-1, 64, 32, 32]"), (96, "[-1, 64, 48, 48]")])
def test_summary_shows_the_network_at_the_streamed_crop(tree, capsys, crop, first_map):
    """``--summary`` builds the input the run trains on: ``--crop_size``, not ImageNet's default 224."""
    assert run_inprocess(["--summary", "--training_type", "ce", "--dataset", "imagenet", "--data_dir", tree,
                          "--crop_size", crop, "--teacher", "resnet18", "--gpu_id", "cpu"]) == 0
    assert capsys.readouterr().out.split("Conv2d-1", 1)[1].split("\n", 1)[0].split()[0:4] == first_map.split()


@pytest.mark.parametrize("args, message", [
    (["--data_path", "device"], "--dataset imagenet is always streamed"),
    (["--data_dir", "{tmp}"], "ImageNet needs"),
    (["--dataset", "synthetic"], "--crop_size is for image files streamed per batch, and synthetic is held in memory"),
    (["--dataset", "imagefolder", "--data_dir", "{folder}"], "--crop_size 16 sets the crop of streamed images"),
])
def test_refusals_are_one_sentence(tree, tmp_path, capsys, args, message):
    (tmp_path / "train").mkdir()
    folder = make_imagefolder(tmp_path / "folder", train_per_class=2, test_per_class=1, size=8, classes=2)
    args = [a.format(tmp=tmp_path, folder=folder) for a in args]
    assert run_inprocess([*STREAM, "--data_dir", tree, "--training_type", "ce", "--path_to_save",
                          tmp_path / "m.pth", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


# ----------------------------------------------------------------------------- batches

def epoch(split, info, generator, **kwargs):
    """One streamed epoch's batches, stacked: (x, y, idx)."""
    batches = list(dataload.train_batches(split, info, 32, "cpu", generator, "stream", **kwargs))
    return tuple(torch.cat(parts) for parts in zip(*batches))


def test_epoch_is_the_same_with_any_number_of_workers_and_after_a_skip(tree):
    data = dataload.load_data("imagenet", str(tree), crop_size=CROP)
    alone, generator = epoch(data.train, data.info, torch.Generator().manual_seed(5)), torch.Generator().manual_seed(5)
    workers = epoch(data.train, data.info, generator, num_workers=2, persistent_workers=True)
    assert all(torch.equal(a, b) for a, b in zip(alone, workers)) and alone[0].shape == (240, 3, CROP, CROP)
    # The persistent workers serve the next epoch, a new permutation with new crops.
    following = epoch(data.train, data.info, generator, num_workers=2, persistent_workers=True)
    assert not torch.equal(following[2], alone[2]) and sorted(following[2].tolist()) == list(range(240))
    tail = epoch(data.train, data.info, torch.Generator().manual_seed(5), skip=3)
    assert all(torch.equal(a[96:], b) for a, b in zip(alone, tail))
    test = [torch.cat(p) for p in zip(*dataload.eval_batches(data.test, data.info, 16, "cpu", num_workers=2))]
    assert torch.equal(test[2], torch.arange(60)) and torch.equal(test[1], data.test.labels)


def test_ranks_get_disjoint_shares_that_cover_the_epoch(tree):
    data = dataload.load_data("imagenet", str(tree), crop_size=CROP)
    seen, evaluated = [], []
    for rank in range(2):
        generator = torch.Generator().manual_seed(9)
        seen.append(epoch(data.train, data.info, generator, rank=rank, world_size=2)[2])
        evaluated += [i for _, _, i in dataload.eval_batches(data.test, data.info, 16, "cpu", rank, 2)]
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    assert sorted(torch.cat(seen).tolist()) == list(range(240)) and torch.equal(torch.cat(evaluated), torch.arange(60))


def test_unreadable_file_mid_epoch_is_named(tree, tmp_path, capsys):
    copy = shutil.copytree(tree, tmp_path / "imagenet")
    broken = copy / "train" / wnid(4) / f"{wnid(4)}_7.JPEG"
    broken.write_bytes(broken.read_bytes()[:200])
    code = run_inprocess([*STREAM, "--data_dir", copy, "--num_workers", "1", "--training_type", "ce",
                          "--path_to_save", tmp_path / "m.pth"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"error: Cannot read image {broken}: ") and "Traceback" not in err


# ----------------------------------------------------------------------------- the console

@pytest.fixture(scope="module")
def pipeline(tree, tmp_path_factory):
    """The pipeline teacher -> heads -> kd and dih students on the stream path, in one folder."""
    out = tmp_path_factory.mktemp("stream_pipeline") / "p"
    return out, ["--training_type", "pipeline", "--data_dir", tree, "--val_size", "20", "--path_to_save", out]


def run_pipeline(pipeline, methods, capsys) -> str:
    """Run the pipeline with ``methods`` (finished steps are skipped); its stdout."""
    out, args = pipeline
    assert run_inprocess([*STREAM, *args, "--ta", "res8", "--epochs_fitnets_1", "1", "--methods", *methods]) == 0
    return capsys.readouterr().out


def test_pipeline_trains_teacher_heads_and_dih_on_the_stream(pipeline, capsys):
    text = run_pipeline(pipeline, ["ce", "kd", "dih"], capsys)
    out, _ = pipeline
    assert "batches: stream (the images stay in their files)" in text
    for name in ("teacher.json", "heads/result.json", "ce_s3.json", "kd_s3.json", "dih_s3.json"):
        record = json.loads((out / name).read_text())
        assert record["complete"] and record["args"]["crop_size"] == CROP and "val" in record["history"][0]
    heads = torch.load(out / "heads" / "head_1.pth", weights_only=True)
    assert heads["image_size"] == CROP and heads["dataset"] == "imagenet" and heads["mount_shapes"][0] == [16, 16, 16]
    assert "| dih |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_every_distilling_type_trains_an_epoch_on_the_stream(pipeline, capsys):
    run_pipeline(pipeline, ["ce", "kd", "dih", *DISTILLING], capsys)
    out, _ = pipeline
    for name in DISTILLING:
        final = "fitnets_s3_final.json" if name == "fitnets" else f"{name}_s3.json"
        assert json.loads((out / final).read_text())["complete"], name


def resumable(tree, folder, *extra) -> list:
    """A two-epoch CE run on the stream path writing ``folder/m.pth``."""
    return [*STREAM, "--data_dir", tree, "--epochs", "2", "--schedule", "2", "--training_type", "ce",
            "--path_to_save", folder / "m.pth", *extra]


def stop_at(monkeypatch, batch):
    """Make the run's stop flag fire once: after batch ``batch`` of the first epoch (None: at its end)."""
    fired = []

    def requested(flag, b=None):
        if fired or b != batch:
            return False
        fired.append(b)
        flag.signum = 15
        return True
    monkeypatch.setattr(run_state.StopFlag, "requested", requested)


def test_resume_after_a_kill_or_mid_epoch_equals_the_uninterrupted_run(tree, tmp_path, monkeypatch):
    (tmp_path / "killed").mkdir()
    # SIGKILLed in a process of its own once epoch 1's checkpoint exists, while the others train here.
    killed = in_background(kill_after_first_epoch, resumable(tree, tmp_path / "killed", "--num_workers", "1"),
                           tmp_path, tmp_path / "killed" / "m.state.pth")
    assert run_inprocess(resumable(tree, tmp_path / "ref")) == 0
    with monkeypatch.context() as patch:
        stop_at(patch, 2)
        assert run_inprocess(resumable(tree, tmp_path / "mid")) == 128 + 15
    assert torch.load(tmp_path / "mid" / "m.state.pth", weights_only=True)["batch"] == 3
    assert run_inprocess(resumable(tree, tmp_path / "mid", "--resume")) == 0
    assert_bit_identical(tmp_path / "ref" / "m.pth", tmp_path / "mid" / "m.pth")
    state = collect(killed)
    assert (state["epoch"], state["batch"]) == (1, 0)
    assert run_inprocess(resumable(tree, tmp_path / "killed", "--resume")) == 0
    # Killed with a worker, resumed and referenced without: the crops do not depend on the workers.
    assert_bit_identical(tmp_path / "ref" / "m.pth", tmp_path / "killed" / "m.pth")


# ----------------------------------------------------------------------------- torchrun and memory

def _shares_worker(rank: int, port: int, root: str, out: str) -> None:
    """One of two gloo ranks: two streamed epochs through loader workers, every rank's indices gathered."""
    from dihkit.runs import distributed
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    d = distributed.from_env()
    data = dataload.load_data("imagenet", root, crop_size=CROP)
    with distributed.process_group(d, torch.device("cpu"), 60):
        generator = torch.Generator().manual_seed(3)
        epochs = [epoch(data.train, data.info, generator, num_workers=1, rank=d.rank, world_size=2)[2].tolist()
                  for _ in range(2)]
        shares = d.gather(epochs)
    if d.is_main:
        with open(out, "w") as f:
            json.dump(shares, f)


@pytest.mark.slow
def test_torchrun_on_the_stream_shares_disjointly_and_evaluates_the_whole_split(tree, tmp_path, monkeypatch):
    mp.spawn(_shares_worker, args=(free_port(), str(tree), str(tmp_path / "shares.json")), nprocs=2)
    shares = json.loads((tmp_path / "shares.json").read_text())
    for e in range(2):
        first, second = shares[0][e], shares[1][e]
        assert not set(first) & set(second) and sorted(first + second) == list(range(240))
    assert shares[0][0] != shares[0][1], "set_epoch's work: every epoch a new permutation"
    proc = torchrun([*STREAM, "--data_dir", tree, "--num_workers", "1", "--val_size", "20", "--training_type", "ce",
                     "--path_to_save", "m.pth"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["world_size"] == 2 and record["complete"]
    alone = evaluate_inprocess(monkeypatch, [*STREAM, "--data_dir", tree, "--saved_path", tmp_path / "m.pth"])
    # Each rank evaluated its half and the counts were summed: the whole validation split, as one process sees it.
    (metrics,), (single,) = record["final_test"].values(), alone["final_test"].values()
    assert alone["test_top1"] == record["test_top1"]
    assert single == {**metrics, "loss": pytest.approx(metrics["loss"], rel=1e-5)}


PEAK_RSS = """
import json, resource, sys
import final_test
code = final_test.main(sys.argv[1:])
print(json.dumps({"code": code, "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.mark.slow
def test_peak_memory_of_a_streamed_run_does_not_grow_with_the_image_count(tmp_path):
    # Pictures large enough that holding the 2,000 decoded (180 MB) would show against the process's ~0.75 GB.
    peaks, sizes = {}, ((200, 150), (150, 200), (180, 180))
    for per_class in (20, 200):
        root = write_tree(tmp_path / f"n{per_class}", 10, per_class, per_class // 4, sizes=sizes)
        done = subprocess.run([sys.executable, "-c", PEAK_RSS, *map(str, STREAM), "--data_dir", root,
                               "--training_type", "ce", "--path_to_save", tmp_path / f"m{per_class}.pth"],
                              cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[per_class] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_kb"]
    print(f"peak RSS: 200 images {peaks[20] / 1024:.1f} MiB, 2,000 images {peaks[200] / 1024:.1f} MiB")
    assert peaks[200] <= 1.10 * peaks[20], peaks


def test_loader_bench_reports_every_figure(tmp_path):
    from bench import loader_bench
    out = tmp_path / "loader.json"
    assert loader_bench.main(["--images", "20", "--tree", str(tmp_path / "tree"), "--crops", "16", "--per_image", "4",
                              "--repeats", "1", "--workers", "0", "1", "--batch_size", "4", "--steps", "1",
                              "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["per_image"]["16"]) == {"decode_pillow", "decode_torchvision", "imagefolder_pillow",
                                              "torchvision_v2", "pillow_box", "pillow_box_draft"}
    assert set(result["loaders"]) == {"stream/0", "imagefolder/0", "stream/1", "imagefolder/1"}
    assert set(result["ratios"]) == {f"{r}/{w}" for r in ("stream_to_imagefolder", "stream_per_worker_to_decode_alone")
                                     for w in (0, 1)}
    assert 0 <= result["data_wait"]["wait_share"] <= 1 and result["tree"]["train_images"] == 20
