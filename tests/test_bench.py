"""The benchmark runs end to end on a tiny setting and reports every ratio the README quotes."""
import json

from console import ROOT, run_subprocess


def test_bench_reports_steps_epochs_ratios_and_targets(tmp_path):
    out = tmp_path / "bench.json"
    done = run_subprocess(["--teacher", "res8", "--student", "res8", "--dataset", "cifar10", "--batch_size", "8",
                           "--warmup", "1", "--steps", "1", "--repeats", "2", "--epoch_images", "16",
                           "--loader_images", "32", "--epoch_repeats", "1", "--num_workers", "0", "--test_images",
                           "8", "--threads", "1", "--out", out], cwd=tmp_path, timeout=300, script="bench/bench.py")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    methods = {"ce", "fine_tune", "kd", "dih", "fitnets", "at", "crd", "tofd", "mhkd"}
    assert set(result["steps"]) == methods | {"dih_original", "teacher_inference", "cohort_inference"}
    assert all(len(s["times_s"]) == 2 and s["images_per_s"] > 0 for s in result["steps"].values())
    assert set(result["epochs"]) == {"ce/device", "fine_tune/device", "kd/device", "dih/device",
                                     "ce_data_path/device", "ce_data_path/loader",
                                     "data_only/device", "data_only/loader"}
    assert {"dih_to_floor", "fine_tune_to_teacher_inference", "dih_original_to_dih",
            "loader_to_device_epoch", "loader_to_device_data_only"} <= set(result["ratios"])
    assert set(result["targets"]) == {"dih_to_floor", "fine_tune_to_teacher_inference", "loader_to_device_epoch"}
    assert all(isinstance(t["met"], bool) for t in result["targets"].values())
    # The original-style step computes the same loss: only its wasted work differs.
    assert result["student_grad_max_abs_diff"] < 1e-6
    assert result["load_average"]["samples_1min"] and result["machine"]["torch"]
    assert "target dih_to_floor" in done.stdout and (ROOT / "bench" / "bench.py").is_file()
