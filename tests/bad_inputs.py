"""The bad inputs of ``test_bad_input``: one table per kind of mistake, and what each case prepares.

Every case is (build(base, case folder) -> console flags, words its one-sentence error must contain); the
recipe's flags come first, so a case's flags override them. ``base`` is the module fixture's folder: the
image-folder data, ``teacher.pth``, its ``heads``, ``other_teacher.pth`` and ``interrupted/kd.state.pth``.
"""
import os
import shutil

import torch

from checkpoints import DIGEST_KEY, atomic_save, model_record
from faults import flip_tensor_byte, hold_lock
from models_repo import build_model


class Evil:
    """Unpickling this runs code: it would create the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))



def write(path, content: bytes = b"") -> None:
    """Create ``path`` (and its folders) with ``content``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def save(obj, path) -> None:
    """torch.save ``obj`` to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


def copy_heads(base, case, drop=(), extra=(), swap=None):
    """A copy of the fixture's heads in the case folder, with heads dropped, added or replaced."""
    folder = case / "heads"
    folder.mkdir()
    for i in (1, 2, 3):
        if i not in drop:
            source = base / "heads" / f"head_{swap[1] if swap and swap[0] == i else i}.pth"
            (folder / f"head_{i}.pth").write_bytes(source.read_bytes())
    for i in extra:
        (folder / f"head_{i}.pth").write_bytes((base / "heads" / "head_1.pth").read_bytes())
    return folder


def dataset(case, layout: dict) -> object:
    """An image-folder dataset in ``case/data`` from ``{relative path: image size or raw bytes}``."""
    from PIL import Image
    root = case / "data"
    root.mkdir()
    for rel, content in layout.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, int):
            Image.new("RGB", (content, content), (120, 30, 200)).save(path)
        elif content is not None:
            path.write_bytes(content)
    return root


def good_split(size=16, per_class=3, classes=("a", "b")) -> dict:
    """The files of a valid small split, per class."""
    return {f"{c}/{n}.png": size for c in classes for n in range(per_class)}


def prefixed(d: dict, prefix: str) -> dict:
    """``d`` with every key under ``prefix``."""
    return {f"{prefix}/{k}": v for k, v in d.items()}


def res_state(arch, classes) -> dict:
    """A plain state dict of a fresh registry model, as other code would save it."""
    return build_model(arch, classes).state_dict()


def copied(source, target):
    """A byte copy of ``source`` at ``target`` (folders created); returns ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def edited(source, target, poison=None, **fields):
    """A toolkit file ``source`` rewritten by the toolkit (so its digest is valid) at ``target``, with record
    ``fields`` replaced and ``poison`` ({state-dict key: value}) put in the first element of those tensors."""
    record = torch.load(source, weights_only=True)
    record.update(fields)
    for key, value in (poison or {}).items():
        record["state_dict"][key].view(-1)[0] = value
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(record, target)
    return target


def flipped(source, target):
    """A copy of ``source`` with one byte inverted inside a tensor: it parses, but its digest no longer fits."""
    flip_tensor_byte(copied(source, target))


def other_images(base, case):
    """A copy of the fixture's data with one training image replaced by one of another class."""
    data = case / "data"
    shutil.copytree(base / "data", data)
    image = sorted((data / "train" / "class_1").iterdir())[0]
    image.write_bytes((data / "train" / "class_2" / image.name).read_bytes())


KD = ["--training_type", "kd"]
DIH = ["--training_type", "dih"]

# id -> (build(base, case) -> extra console args, expected words of the message). The recipe's flags come first,
# so a case's flags override them. One table per kind of mistake; CASES holds them all.
EARLIER_CASES = {
    "unknown_training_type": (lambda b, c: ["--training_type", "distil"], "invalid choice"),
    "unknown_student": (lambda b, c: ["--student", "res999"], "invalid choice"),
    "unknown_dataset": (lambda b, c: ["--dataset", "mnist"], "invalid choice"),
    "bad_boolean": (lambda b, c: ["--nesterov", "maybe"], "expected True/False"),
    "non_numeric_epochs": (lambda b, c: ["--epochs", "three"], "invalid int value"),
    "negative_batch_size": (lambda b, c: ["--batch_size", "-4"], "--batch_size must be an integer >= 1, got -4"),
    "zero_epochs": (lambda b, c: ["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    "alpha_above_one": (lambda b, c: [*KD, "--kd_alpha", "1.5"], "must be a finite number >= 0 and <= 1, got 1.5"),
    "alpha_below_zero": (lambda b, c: [*KD, "--alpha", "-0.1"], "must be a finite number >= 0 and <= 1, got -0.1"),
    "temperature_zero": (lambda b, c: [*KD, "--kd_temperature", "0"], "temperature must be a finite number > 0, got 0"),
    "temperature_negative": (lambda b, c: [*KD, "--temperature", "-2"], "temperature must be a finite number > 0, got -2"),
    "milestone_beyond_epochs": (lambda b, c: ["--schedule", "5"], "milestone 5 is outside 1..3"),
    "zero_learning_rate": (lambda b, c: ["--lr", "0"], "--lr must be a finite number > 0, got 0"),
    "resume_with_overwrite": (lambda b, c: ["--resume", "--overwrite"], "contradict"),
    "gpu_that_does_not_exist": (lambda b, c: ["--gpu_id", "cuda:7"], "cuda:7"),
    "gpu_id_garbage": (lambda b, c: ["--gpu_id", "banana"], "--gpu_id must be cuda:N or cpu"),
    "val_size_not_multiple": (lambda b, c: ["--val_size", "21"], "multiple of the number of classes"),
    "train_subset_too_large": (lambda b, c: ["--train_subset", "400"], "images per class"),
    "dataset_folder_empty": (lambda b, c: ["--data_dir", dataset(c, {})], "one subfolder per class"),
    "dataset_without_classes": (lambda b, c: ["--data_dir", dataset(c, {"train/x.txt": b"", "test/x.txt": b""})],
                                "no class subfolders"),
    "class_without_images": (lambda b, c: ["--data_dir", dataset(c, {**prefixed(good_split(), "train"),
                                                                      "train/c/notes.txt": b"x",
                                                                      **prefixed(good_split(classes="abc"), "test")})],
                             "contains no images"),
    "unreadable_image": (lambda b, c: ["--data_dir", dataset(c, {**prefixed(good_split(), "train"),
                                                                  "train/b/broken.png": b"\x89PNG\r\n\x1a\n garbage",
                                                                  **prefixed(good_split(), "test")})],
                         "broken.png"),
    "test_classes_differ": (lambda b, c: ["--data_dir", dataset(c, {**prefixed(good_split(), "train"),
                                                                     **prefixed(good_split(classes="ax"), "test")})],
                            "same class folders"),
    "images_of_mixed_sizes": (lambda b, c: ["--data_dir", dataset(c, {**prefixed(good_split(), "train"),
                                                                       "train/a/big.png": 24,
                                                                       **prefixed(good_split(), "test")})],
                              "big.png"),
    "teacher_missing": (lambda b, c: [*KD, "--saved_path", c / "nope.pth"], "does not exist"),
    "teacher_not_given": (lambda b, c: KD, "needs --saved_path"),
    "teacher_truncated": (lambda b, c: [*KD, "--saved_path", c / "t.pth"], "truncated"),
    "teacher_empty_file": (lambda b, c: [*KD, "--saved_path", c / "t.pth"], "truncated"),
    "teacher_text_file": (lambda b, c: [*KD, "--saved_path", c / "t.pth"], "not a PyTorch checkpoint"),
    "teacher_is_a_folder": (lambda b, c: [*KD, "--saved_path", c], "is a folder"),
    "teacher_of_other_architecture": (lambda b, c: [*KD, "--teacher", "res14", "--saved_path", b / "teacher.pth"],
                                      "holds a res8, not the requested res14"),
    "foreign_teacher_of_other_architecture": (lambda b, c: [*KD, "--saved_path", c / "t.pth"], "does not fit"),
    "teacher_of_other_class_count": (lambda b, c: [*KD, "--saved_path", c / "t.pth"], "trained for 10 classes"),
    "foreign_teacher_of_other_class_count": (lambda b, c: [*KD, "--saved_path", c / "t.pth"],
                                             "'fc.weight' has shape (10, 64), expected (4, 64)"),
    "teacher_crafted_pickle": (lambda b, c: [*KD, "--saved_path", c / "t.pth"], "refused"),
    "head_file_as_teacher": (lambda b, c: [*KD, "--saved_path", b / "heads" / "head_1.pth"], "is a head file"),
    "heads_not_given": (lambda b, c: [*DIH, "--saved_path", b / "teacher.pth"],
                        "needs --saved_intermediates_directory"),
    "heads_folder_missing": (lambda b, c: [*DIH, "--saved_path", b / "teacher.pth",
                                           "--saved_intermediates_directory", c / "nope"], "does not exist"),
    "heads_folder_empty": (lambda b, c: [*DIH, "--saved_path", b / "teacher.pth",
                                         "--saved_intermediates_directory", c / "heads"], "holds no head_<i>.pth"),
    "head_missing": (lambda b, c: [*DIH, "--saved_path", b / "teacher.pth",
                                   "--saved_intermediates_directory", copy_heads(b, c, drop=(2,))], "lacks head_2.pth"),
    "head_extra": (lambda b, c: [*DIH, "--saved_path", b / "teacher.pth",
                                 "--saved_intermediates_directory", copy_heads(b, c, extra=(4,))], "extra head_4.pth"),
    "head_mismatched": (lambda b, c: [*DIH, "--saved_path", b / "teacher.pth",
                                      "--saved_intermediates_directory", copy_heads(b, c, swap=(2, 3))],
                        "holds head 3, not head 2"),
    "heads_of_another_teacher_checkpoint": (lambda b, c: [*DIH, "--saved_path", b / "other_teacher.pth",
                                                          "--saved_intermediates_directory", b / "heads"],
                                            "fine-tuned on a different res8 checkpoint"),
    "head_truncated": (lambda b, c: [*DIH, "--saved_path", b / "teacher.pth",
                                     "--saved_intermediates_directory", c / "heads"], "truncated"),
    "output_under_a_file": (lambda b, c: ["--path_to_save", c / "file" / "sub" / "m.pth"], "is a file, not a folder"),
    "output_exists": (lambda b, c: ["--path_to_save", b / "teacher.pth"], "already exists; pass --overwrite"),
    "interrupted_run_without_resume": (lambda b, c: [*KD, "--saved_path", b / "teacher.pth", "--path_to_save",
                                                     b / "interrupted" / "kd.pth"], "pass --resume to continue it"),
    "file_output_is_a_folder": (lambda b, c: ["--path_to_save", c], "is a folder, but"),
    "heads_output_is_a_file": (lambda b, c: ["--training_type", "fine_tune", "--saved_path", b / "teacher.pth",
                                             "--path_to_save", c / "file"], "is a file, but"),
    "second_seed_output_exists": (lambda b, c: ["--seed", "1", "2", "--path_to_save", c / "m.pth"],
                                  "m_s2.pth' already exists"),
    "resume_with_changed_lr": (lambda b, c: [*KD, "--saved_path", b / "teacher.pth", "--resume", "--lr", "0.05",
                                             "--path_to_save", b / "interrupted" / "kd.pth"], "--lr was 0.1"),
    "resume_with_changed_seed": (lambda b, c: [*KD, "--saved_path", b / "teacher.pth", "--resume", "--seed", "6",
                                               "--path_to_save", b / "interrupted" / "kd.pth"], "--seed was 5"),
    "resume_with_changed_student": (lambda b, c: [*KD, "--saved_path", b / "teacher.pth", "--resume", "--student",
                                                  "res14", "--path_to_save", b / "interrupted" / "kd.pth"],
                                    "--student was 'res8'"),
    "resume_with_changed_loss_weight": (lambda b, c: [*KD, "--saved_path", b / "teacher.pth", "--resume",
                                                      "--kd_alpha", "0.3", "--path_to_save",
                                                      b / "interrupted" / "kd.pth"], "--kd_alpha was 0.1"),
    "resume_with_other_teacher": (lambda b, c: [*KD, "--saved_path", b / "other_teacher.pth", "--resume",
                                                "--path_to_save", b / "interrupted" / "kd.pth"],
                                  "frozen teacher or heads differ"),
    "resume_with_other_method": (lambda b, c: ["--training_type", "ce", "--resume", "--path_to_save",
                                               b / "interrupted" / "kd.pth"], "belongs to phase kd, not ce"),
    "resume_from_corrupted_checkpoint": (lambda b, c: [*KD, "--saved_path", b / "teacher.pth", "--resume",
                                                       "--path_to_save", c / "kd.pth"], "resume state"),
    "evaluate_without_model": (lambda b, c: ["--training_type", "test"], "needs --saved_path"),
    "fitnets_layer_that_does_not_exist": (lambda b, c: ["--training_type", "fitnets", "--saved_path",
                                                        b / "teacher.pth", "--hint_layer", "9"], "--hint_layer 9"),
    "assistant_larger_than_teacher": (lambda b, c: ["--training_type", "takd", "--saved_path", b / "teacher.pth",
                                                    "--ta", "res110"], "larger than the teacher"),
}

# Files some cases need, written before the snapshot (a live process holding a claim is returned, to be killed).
EARLIER_PREPARE = {
    "teacher_truncated": lambda b, c: write(c / "t.pth", (b / "teacher.pth").read_bytes()[:5000]),
    "teacher_empty_file": lambda b, c: write(c / "t.pth"),
    "teacher_text_file": lambda b, c: write(c / "t.pth", b"these are not weights\n"),
    "foreign_teacher_of_other_architecture": lambda b, c: save(res_state("res14", 4), c / "t.pth"),
    "teacher_of_other_class_count": lambda b, c: atomic_save(model_record(build_model("res8", 10), "res8", 10,
                                                                          "imagefolder", 16), c / "t.pth"),
    "foreign_teacher_of_other_class_count": lambda b, c: save(res_state("res8", 10), c / "t.pth"),
    "teacher_crafted_pickle": lambda b, c: save({"state_dict": Evil(c / "marker")}, c / "t.pth"),
    "head_truncated": lambda b, c: write(copy_heads(b, c) / "head_2.pth",
                                         (b / "heads" / "head_2.pth").read_bytes()[:3000]),
    "output_under_a_file": lambda b, c: write(c / "file", b"a file, not a folder"),
    "heads_output_is_a_file": lambda b, c: write(c / "file", b"a file, not a folder"),
    "heads_folder_empty": lambda b, c: (c / "heads").mkdir(),
    "second_seed_output_exists": lambda b, c: write(c / "m_s2.pth", b"an earlier result"),
    "resume_from_corrupted_checkpoint": lambda b, c: write(
        c / "kd.state.pth", (b / "interrupted" / "kd.state.pth").read_bytes()[:-100]),
}

TAKD = ["--training_type", "takd", "--ta", "res8"]
TEST = ["--training_type", "test"]
RESUME = ["--resume", "--path_to_save"]  # then the fixture's interrupted KD run (``interrupted``)


def interrupted(b, *flags):
    """A --resume of the fixture's interrupted KD run with ``flags`` changed."""
    return [*KD, "--saved_path", b / "teacher.pth", *flags, *RESUME, b / "interrupted" / "kd.pth"]


def heads_of(b, c, *extra):
    """DIH from the fixture's teacher and the heads copied into the case folder."""
    return [*DIH, "--saved_path", b / "teacher.pth", "--saved_intermediates_directory", c / "heads", *extra]


# Numbers outside their declared range, repeated or decreasing lists, unknown names (checked before any work).
RANGE_CASES = {
    "lr_infinite": (lambda b, c: ["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    "lr_not_a_number": (lambda b, c: ["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    "weight_decay_negative": (lambda b, c: ["--wd", "-0.1"], "--wd must be a finite number >= 0, got -0.1"),
    "momentum_one": (lambda b, c: ["--momentum", "1"], "--momentum must be a finite number >= 0 and < 1, got 1"),
    "schedule_gamma_zero": (lambda b, c: ["--schedule_gamma", "0"], "--schedule_gamma must be a finite number > 0"),
    "schedule_decreasing": (lambda b, c: ["--schedule", "2", "1"], "--schedule must strictly increase, got 2 1"),
    "schedule_repeated": (lambda b, c: ["--schedule", "1", "1"], "--schedule must strictly increase, got 1 1"),
    "schedule_zero": (lambda b, c: ["--schedule", "0", "2"], "--schedule must be an integer >= 1, got 0"),
    "seed_negative": (lambda b, c: ["--seed", "-1"], "--seed must be an integer >= 0 and <= "),
    "seed_beyond_32_bits": (lambda b, c: ["--seed", str(2 ** 32)], "--seed must be an integer >= 0 and <= "),
    "seed_repeated": (lambda b, c: ["--seed", "3", "3"], "--seed must be distinct, got 3 3"),
    "val_size_negative": (lambda b, c: ["--val_size", "-4"], "--val_size must be an integer >= 0, got -4"),
    "train_subset_negative": (lambda b, c: ["--train_subset", "-1"], "--train_subset must be an integer >= 0"),
    "num_workers_negative": (lambda b, c: ["--num_workers", "-2"], "--num_workers must be an integer >= 0"),
    "dist_timeout_zero": (lambda b, c: ["--dist_timeout", "0"], "--dist_timeout must be a finite number > 0"),
    "concurrent_seeds_zero": (lambda b, c: ["--concurrent_seeds", "0"], "--concurrent_seeds must be an integer >= 1"),
    "temperature_infinite": (lambda b, c: [*KD, "--kd_temperature", "inf"], "must be a finite number > 0, got inf"),
    "alpha_not_a_number": (lambda b, c: [*KD, "--kd_alpha", "nan"], "must be a finite number >= 0 and <= 1, got nan"),
    "fitnets_stage1_epochs_zero": (lambda b, c: ["--epochs_fitnets_1", "0"], "--epochs_fitnets_1 must be an integer"),
    "fitnets_stage1_lr_infinite": (lambda b, c: ["--lr_fitnets_1", "inf"], "--lr_fitnets_1 must be a finite number"),
    "fitnets_stage1_schedule_decreasing": (lambda b, c: ["--schedule_fitnets_1", "3", "2"],
                                           "--schedule_fitnets_1 must strictly increase"),
    "at_beta_negative": (lambda b, c: ["--at_beta", "-1"], "--at_beta must be a finite number >= 0, got -1"),
    "at_exponent_zero": (lambda b, c: ["--at_p", "0"], "--at_p must be a finite number > 0, got 0"),
    "crd_negatives_zero": (lambda b, c: ["--nce_k", "0"], "--nce_k must be an integer >= 1, got 0"),
    "crd_momentum_one": (lambda b, c: ["--nce_m", "1"], "--nce_m must be a finite number >= 0 and < 1, got 1"),
    "baseline_beta_negative": (lambda b, c: ["--beta", "-0.5"], "--beta must be a finite number >= 0, got -0.5"),
    "pipeline_teacher_epochs_zero": (lambda b, c: ["--training_type", "pipeline", "--teacher_epochs", "0"],
                                     "--teacher_epochs must be an integer >= 1, got 0"),
    "pipeline_teacher_schedule_decreasing": (lambda b, c: ["--training_type", "pipeline", "--teacher_schedule", "3",
                                                           "1"], "--teacher_schedule must strictly increase"),
    "pipeline_method_repeated": (lambda b, c: ["--training_type", "pipeline", "--methods", "kd", "kd"],
                                 "lists kd more than once"),
    "nan_policy_unknown": (lambda b, c: ["--nan_policy", "ignore"], "invalid choice"),
    "unknown_flag": (lambda b, c: ["--learning_rate", "0.1"], "unrecognized arguments"),
}

# Outputs that name nothing, are too long, or collide with each other or with an input (resolved paths).
OUTPUT_CASES = {
    "output_is_the_root": (lambda b, c: ["--path_to_save", "/"], "--path_to_save '/' names no file or folder"),
    "output_is_the_current_folder": (lambda b, c: ["--path_to_save", "."], "--path_to_save '.' names no file"),
    "output_is_empty": (lambda b, c: ["--path_to_save", ""], "--path_to_save '' names no file"),
    "output_is_the_parent_folder": (lambda b, c: ["--path_to_save", ".."], "--path_to_save '..' names no file"),
    "output_name_too_long": (lambda b, c: ["--path_to_save", c / ("m" * 250 + ".pth")], "is too long for the file"),
    "seed_suffix_makes_a_name_too_long": (lambda b, c: ["--seed", "10", "12", "--path_to_save", c / ("m" * 230 + ".pth")],
                                          "_s10.best.pth' is too long for the file system"),
    "folder_name_too_long": (lambda b, c: ["--path_to_save", c / ("d" * 300) / "m.pth"], "is too long for the file"),
    "model_and_result_are_one_file": (lambda b, c: ["--path_to_save", c / "run.json"],
                                      "run.json' is the same path as the result file"),
    "model_is_the_teacher": (lambda b, c: [*KD, "--saved_path", c / "t.pth", "--path_to_save", c / "t.pth",
                                           "--overwrite"], "is the same path as the input --saved_path"),
    "model_is_the_teacher_through_a_link": (lambda b, c: [*KD, "--saved_path", c / "t.pth", "--path_to_save",
                                                          c / "link.pth", "--overwrite"],
                                            "link.pth' is the same path as the input --saved_path"),
    "model_is_the_teacher_through_dotdot": (lambda b, c: [*KD, "--saved_path", c / "t.pth", "--path_to_save",
                                                          c / "sub" / ".." / "t.pth"], "same path as the input"),
    "checkpoint_is_the_teacher": (lambda b, c: [*KD, "--saved_path", c / "t.state.pth", "--path_to_save",
                                                c / "t.pth"], "the checkpoint '"),
    "result_file_is_the_teacher": (lambda b, c: [*KD, "--saved_path", c / "m.json", "--path_to_save", c / "m.pth"],
                                   "the result file '"),
    "second_seed_is_the_teacher": (lambda b, c: [*KD, "--seed", "1", "2", "--saved_path", c / "m_s2.pth",
                                                 "--path_to_save", c / "m.pth"], "m_s2.pth' is the same path"),
    "fitnets_stage_2_is_the_teacher": (lambda b, c: ["--training_type", "fitnets", "--saved_path", c / "s_final.pth",
                                                     "--path_to_save", c / "s.pth"], "s_final.pth' is the same path"),
    "takd_assistant_is_the_teacher": (lambda b, c: [*TAKD, "--saved_path", c / "s_ta_res8.pth", "--path_to_save",
                                                    c / "s.pth"], "s_ta_res8.pth' is the same path"),
    "takd_reused_assistant_is_the_output": (lambda b, c: [*TAKD, "--saved_path", b / "teacher.pth", "--saved_ta_path",
                                                          c / "s.pth", "--path_to_save", c / "s.pth", "--overwrite"],
                                            "same path as the input --saved_ta_path"),
    "tofd_aux_folder_is_the_teacher": (lambda b, c: ["--training_type", "tofd", "--saved_path", c / "s_tofd_teacher_aux",
                                                     "--path_to_save", c / "s.pth"], "the heads folder '"),
    "mhkd_aux_folder_holds_the_teacher": (lambda b, c: ["--training_type", "mhkd", "--saved_path",
                                                        c / "s_mhkd_teacher_aux" / "t.pth", "--path_to_save", c / "s.pth"],
                                          "is a folder holding the input --saved_path"),
    "heads_output_holds_the_teacher": (lambda b, c: ["--training_type", "fine_tune", "--saved_path", c / "t.pth",
                                                     "--path_to_save", c], "is a folder holding the input --saved_path"),
    "heads_output_is_the_teacher": (lambda b, c: ["--training_type", "fine_tune", "--saved_path", b / "teacher.pth",
                                                  "--path_to_save", b / "teacher.pth"], "same path as the input"),
    "output_inside_the_heads_input": (lambda b, c: [*DIH, "--saved_path", b / "teacher.pth",
                                                    "--saved_intermediates_directory", b / "heads", "--path_to_save",
                                                    b / "heads" / "dih.pth"],
                                      "lies inside the input --saved_intermediates_directory"),
    "output_is_the_heads_input": (lambda b, c: [*DIH, "--saved_path", b / "teacher.pth",
                                                "--saved_intermediates_directory", b / "heads", "--path_to_save",
                                                b / "heads"], "same path as the input --saved_intermediates_directory"),
    "tofd_output_inside_its_reused_folder": (lambda b, c: ["--training_type", "tofd", "--saved_path", b / "teacher.pth",
                                                           "--saved_tofd_directory", b / "heads", "--path_to_save",
                                                           b / "heads" / "s.pth"],
                                             "lies inside the input --saved_tofd_directory"),
}

# Outputs a live run claims: refused at once, naming it (every phase and every seed counts, --resume too).
CLAIM_CASES = {
    "output_claimed_by_a_live_run": (lambda b, c: [], "out.pth' is claimed by another run that is still going (PID"),
    "claimed_output_with_resume": (lambda b, c: ["--resume"], "out.pth' is claimed by another run"),
    "result_file_claimed_by_a_live_run": (lambda b, c: [], "out.json' is claimed by another run"),
    "second_seed_claimed_by_a_live_run": (lambda b, c: ["--seed", "1", "2"], "out_s2.pth' is claimed by another run"),
    "fitnets_stage_2_claimed": (lambda b, c: ["--training_type", "fitnets", "--saved_path", b / "teacher.pth"],
                                "out_final.pth' is claimed by another run"),
    "heads_folder_claimed_by_a_live_run": (lambda b, c: ["--training_type", "fine_tune", "--saved_path",
                                                         b / "teacher.pth", "--path_to_save", c / "heads"],
                                           "heads' is claimed by another run"),
}

# Trained inputs whose bytes changed on disk, or whose weights are not finite.
DAMAGE_CASES = {
    "teacher_bytes_flipped": (lambda b, c: [*KD, "--saved_path", c / "t.pth"], "t.pth' is corrupted"),
    "teacher_digest_altered": (lambda b, c: [*KD, "--saved_path", c / "t.pth"], "t.pth' is corrupted"),
    "head_bytes_flipped": (lambda b, c: heads_of(b, c), "head_2.pth' is corrupted"),
    "resume_state_bytes_flipped": (lambda b, c: [*KD, "--saved_path", b / "teacher.pth", *RESUME, c / "kd.pth"],
                                   "kd.state.pth' is corrupted"),
    "assistant_bytes_flipped": (lambda b, c: [*TAKD, "--saved_path", b / "teacher.pth", "--saved_ta_path", c / "ta.pth"],
                                "--saved_ta_path checkpoint"),
    "evaluated_model_bytes_flipped": (lambda b, c: [*TEST, "--saved_path", c / "t.pth"], "t.pth' is corrupted"),
    "teacher_nan_weight": (lambda b, c: [*KD, "--saved_path", c / "t.pth"],
                           "holds non-finite weights: tensor 'fc.weight'"),
    "teacher_infinite_buffer": (lambda b, c: [*KD, "--saved_path", c / "t.pth"], "tensor 'stem.1.running_var'"),
    "foreign_teacher_nan_weight": (lambda b, c: [*KD, "--saved_path", c / "t.pth"], "tensor 'fc.bias' has NaN"),
    "head_nan_weight": (lambda b, c: heads_of(b, c), "head_3.pth' holds non-finite weights: tensor 'fc.bias'"),
    "assistant_infinite_weight": (lambda b, c: [*TAKD, "--saved_path", b / "teacher.pth", "--saved_ta_path",
                                                c / "ta.pth"], "ta.pth' holds non-finite weights"),
    "evaluated_model_nan_weight": (lambda b, c: [*TEST, "--saved_path", c / "t.pth"], "tensor 'fc.weight'"),
}

# Heads folders with strays or heads recorded for another teacher, and teachers recorded for other data.
RECORD_CASES = {
    "head_stray_with_leading_zero": (lambda b, c: heads_of(b, c), "holds 'head_02.pth', which looks like a head"),
    "head_stray_numbered_zero": (lambda b, c: heads_of(b, c), "holds 'head_0.pth', which looks like a head"),
    "head_stray_not_numbered": (lambda b, c: heads_of(b, c), "holds 'head_x.pth', which looks like a head"),
    "tofd_folder_with_stray": (lambda b, c: ["--training_type", "tofd", "--saved_path", b / "teacher.pth",
                                             "--saved_tofd_directory", c / "heads"], "holds 'head_01.pth'"),
    "evaluated_heads_with_stray": (lambda b, c: [*TEST, "--saved_path", b / "teacher.pth",
                                                 "--saved_intermediates_directory", c / "heads"], "holds 'head_002.pth'"),
    "heads_of_other_teacher_architecture": (lambda b, c: heads_of(b, c), "with teacher_arch=res14, but"),
    "heads_of_other_dataset": (lambda b, c: heads_of(b, c), "with dataset=cifar10, but"),
    "heads_of_other_class_count": (lambda b, c: heads_of(b, c), "with num_classes=10, but"),
    "heads_of_different_epochs": (lambda b, c: heads_of(b, c), "was saved by another run or epoch"),
    "heads_recording_fewer_heads": (lambda b, c: heads_of(b, c), "has an extra head_3.pth"),
    "heads_folder_is_a_file": (lambda b, c: [*DIH, "--saved_path", b / "teacher.pth", "--saved_intermediates_directory",
                                             b / "teacher.pth"], "is a file, not a folder of heads"),
    "teacher_of_other_dataset": (lambda b, c: [*KD, "--saved_path", c / "t.pth"], "trained on cifar10, not on imagefolder"),
    "teacher_of_other_image_size": (lambda b, c: [*KD, "--saved_path", c / "t.pth"], "trained on 32px images"),
    "teacher_classes_checked_before_a_download": (lambda b, c: [*KD, "--dataset", "cifar100", "--data_dir", c / "none",
                                                                "--saved_path", b / "teacher.pth"],
                                                  "trained for 4 classes, but the dataset has 100"),
    "evaluated_model_of_other_dataset": (lambda b, c: [*TEST, "--dataset", "synthetic", "--saved_path",
                                                       b / "teacher.pth"], "trained for 4 classes, but the dataset has 10"),
}

# Resumes that would change what is trained, and data with a single class.
RESUME_CASES = {
    "resume_with_changed_train_subset": (lambda b, c: interrupted(b, "--train_subset", "60"), "--train_subset was 0"),
    "resume_with_changed_val_size": (lambda b, c: interrupted(b, "--val_size", "40"), "--val_size was 20"),
    "resume_with_changed_epochs": (lambda b, c: interrupted(b, "--epochs", "4"), "--epochs was 3"),
    "resume_with_changed_batch_size": (lambda b, c: interrupted(b, "--batch_size", "20"), "--batch_size was 40"),
    "resume_with_changed_temperature": (lambda b, c: interrupted(b, "--kd_temperature", "4"), "--kd_temperature was 5"),
    "resume_on_other_data_files": (lambda b, c: interrupted(b, "--data_dir", c / "data"), "the training data differ"),
    "dataset_with_one_class": (lambda b, c: ["--data_dir", dataset(c, {**prefixed(good_split(classes="a"), "train"),
                                                                       **prefixed(good_split(classes="a"), "test")})],
                               "has only one class folder"),
}

NEW_PREPARE = {
    "model_is_the_teacher": lambda b, c: copied(b / "teacher.pth", c / "t.pth"),
    "model_is_the_teacher_through_a_link": lambda b, c: os.symlink(copied(b / "teacher.pth", c / "t.pth"), c / "link.pth"),
    "model_is_the_teacher_through_dotdot": lambda b, c: copied(b / "teacher.pth", c / "t.pth"),
    "checkpoint_is_the_teacher": lambda b, c: copied(b / "teacher.pth", c / "t.state.pth"),
    "result_file_is_the_teacher": lambda b, c: copied(b / "teacher.pth", c / "m.json"),
    "second_seed_is_the_teacher": lambda b, c: copied(b / "teacher.pth", c / "m_s2.pth"),
    "fitnets_stage_2_is_the_teacher": lambda b, c: copied(b / "teacher.pth", c / "s_final.pth"),
    "takd_assistant_is_the_teacher": lambda b, c: copied(b / "teacher.pth", c / "s_ta_res8.pth"),
    "takd_reused_assistant_is_the_output": lambda b, c: copied(b / "teacher.pth", c / "s.pth"),
    "tofd_aux_folder_is_the_teacher": lambda b, c: copied(b / "teacher.pth", c / "s_tofd_teacher_aux"),
    "mhkd_aux_folder_holds_the_teacher": lambda b, c: copied(b / "teacher.pth", c / "s_mhkd_teacher_aux" / "t.pth"),
    "heads_output_holds_the_teacher": lambda b, c: copied(b / "teacher.pth", c / "t.pth"),
    "output_claimed_by_a_live_run": lambda b, c: hold_lock(c / "out.pth"),
    "claimed_output_with_resume": lambda b, c: hold_lock(c / "out.pth"),
    "result_file_claimed_by_a_live_run": lambda b, c: hold_lock(c / "out.json"),
    "second_seed_claimed_by_a_live_run": lambda b, c: hold_lock(c / "out_s2.pth"),
    "fitnets_stage_2_claimed": lambda b, c: hold_lock(c / "out_final.pth"),
    "heads_folder_claimed_by_a_live_run": lambda b, c: hold_lock(c / "heads"),
    "teacher_bytes_flipped": lambda b, c: flipped(b / "teacher.pth", c / "t.pth"),
    "teacher_digest_altered": lambda b, c: torch.save({**torch.load(b / "teacher.pth", weights_only=True),
                                                       DIGEST_KEY: "0" * 64}, c / "t.pth"),
    "head_bytes_flipped": lambda b, c: flip_tensor_byte(copy_heads(b, c) / "head_2.pth"),
    "resume_state_bytes_flipped": lambda b, c: flipped(b / "interrupted" / "kd.state.pth", c / "kd.state.pth"),
    "assistant_bytes_flipped": lambda b, c: flipped(b / "teacher.pth", c / "ta.pth"),
    "evaluated_model_bytes_flipped": lambda b, c: flipped(b / "teacher.pth", c / "t.pth"),
    "teacher_nan_weight": lambda b, c: edited(b / "teacher.pth", c / "t.pth", {"fc.weight": float("nan")}),
    "teacher_infinite_buffer": lambda b, c: edited(b / "teacher.pth", c / "t.pth", {"stem.1.running_var": float("inf")}),
    "foreign_teacher_nan_weight": lambda b, c: save({"state_dict": {**res_state("res8", 4), "fc.bias": torch.full(
        (4,), float("nan"))}}, c / "t.pth"),
    "head_nan_weight": lambda b, c: edited(b / "heads" / "head_3.pth", copy_heads(b, c) / "head_3.pth",
                                           {"fc.bias": float("nan")}),
    "assistant_infinite_weight": lambda b, c: edited(b / "teacher.pth", c / "ta.pth", {"fc.weight": float("-inf")}),
    "evaluated_model_nan_weight": lambda b, c: edited(b / "teacher.pth", c / "t.pth", {"fc.weight": float("nan")}),
    "head_stray_with_leading_zero": lambda b, c: copied(b / "heads" / "head_2.pth", copy_heads(b, c) / "head_02.pth"),
    "head_stray_numbered_zero": lambda b, c: copied(b / "heads" / "head_1.pth", copy_heads(b, c) / "head_0.pth"),
    "head_stray_not_numbered": lambda b, c: write(copy_heads(b, c) / "head_x.pth", b"notes"),
    "tofd_folder_with_stray": lambda b, c: copied(b / "heads" / "head_1.pth", copy_heads(b, c) / "head_01.pth"),
    "evaluated_heads_with_stray": lambda b, c: copied(b / "heads" / "head_2.pth", copy_heads(b, c) / "head_002.pth"),
    "heads_of_other_teacher_architecture": lambda b, c: edited(b / "heads" / "head_1.pth",
                                                               copy_heads(b, c) / "head_1.pth", teacher_arch="res14"),
    "heads_of_other_dataset": lambda b, c: edited(b / "heads" / "head_1.pth", copy_heads(b, c) / "head_1.pth",
                                                  dataset="cifar10"),
    "heads_of_other_class_count": lambda b, c: edited(b / "heads" / "head_2.pth", copy_heads(b, c) / "head_2.pth",
                                                      num_classes=10),
    "heads_of_different_epochs": lambda b, c: edited(b / "heads" / "head_3.pth", copy_heads(b, c) / "head_3.pth",
                                                     epoch=99),
    "heads_recording_fewer_heads": lambda b, c: edited(b / "heads" / "head_1.pth", copy_heads(b, c) / "head_1.pth",
                                                       num_heads=2),
    "teacher_of_other_dataset": lambda b, c: edited(b / "teacher.pth", c / "t.pth", dataset="cifar10"),
    "teacher_of_other_image_size": lambda b, c: edited(b / "teacher.pth", c / "t.pth", image_size=32),
    "resume_on_other_data_files": other_images,
}

CASES = {**EARLIER_CASES, **RANGE_CASES, **OUTPUT_CASES, **CLAIM_CASES, **DAMAGE_CASES, **RECORD_CASES, **RESUME_CASES}
PREPARE = {**EARLIER_PREPARE, **NEW_PREPARE}
