"""Registry models for a run: fresh ones, skeletons for sizes, and trained ones checked and loaded.

A run's trained inputs are ``--saved_path`` and ``--saved_intermediates_directory`` when its training type
``needs`` them, and the type's own ``--saved_*`` flags (a name ending in ``_directory``: a folder of heads).
``check_inputs`` reads their records before any data is: what a file says of itself (architecture, classes,
dataset, image size, digest, finite weights) is refused there, before anything is loaded or written.
"""
from pathlib import Path

import torch
from torch import nn

import dataload
from dihkit.files.checkpoints import file_arch, load_model_file, read_model_file
from dih_utils import check_heads_folder, freeze
from dihkit.foundations.errors import UserError
from models_repo import build_model, count_parameters
from dihkit.foundations.registry import TrainingType
from dihkit.runs.run_context import RunContext
from dihkit.foundations.settings import Settings


def model_meta(ctx: RunContext, arch: str, **extra) -> dict:
    """What a saved model records about itself and its run."""
    return {"arch": arch, "num_classes": ctx.info.num_classes, "dataset": ctx.info.name,
            "image_size": ctx.info.image_size, "training_type": ctx.cfg.training_type, "seed": ctx.seed, **extra}


def new_model(ctx: RunContext, arch: str) -> nn.Module:
    """A freshly initialised registry model for the run's dataset, on the run's device."""
    return build_model(arch, ctx.info.num_classes).to(ctx.device)


def skeleton(arch: str) -> nn.Module:
    """A registry model on the meta device: its structure without memory, time, RNG draws or data (its
    classifier has a placeholder size: the class count can come from the data)."""
    with torch.device("meta"):
        return build_model(arch, 2)


def size_before_classifier(arch: str) -> int:
    """Parameters of ``arch`` except its final linear classifier, whose size follows the dataset's classes."""
    model = skeleton(arch)
    return count_parameters(model) - count_parameters(model.fc)


def load_trained(ctx: RunContext, arch: str, path, what: str) -> tuple[nn.Module, dict]:
    """A registry model with weights from ``path``, checked against ``arch`` and the dataset."""
    if path is None:
        raise UserError(f"{what} needs --saved_path (the trained {arch} checkpoint)")
    # Its initial weights are overwritten: drawing them from the run's RNG would make a student's first weights
    # depend on what else the method loads (KD's, DIH's and CE's students start alike at one seed).
    with torch.random.fork_rng(devices=[]):
        model = build_model(arch, ctx.info.num_classes)
    meta = load_model_file(path, model, arch, ctx.info.num_classes, what, ctx.info.name)
    if meta.get("image_size") not in (None, ctx.info.image_size):
        raise UserError(f"{what} '{path}' was trained on {meta['image_size']}px images, "
                        f"but {ctx.info.name} has {ctx.info.image_size}px")
    model = model.to(ctx.device)
    if ctx.cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, meta


def load_teacher(ctx: RunContext) -> nn.Module:
    """The frozen teacher named by ``--teacher`` and ``--saved_path``."""
    teacher, _ = load_trained(ctx, ctx.cfg.models.teacher, ctx.cfg.models.saved_path, "teacher checkpoint")
    return freeze(teacher)


def trained_inputs(t: TrainingType | None, cfg: Settings) -> list[tuple[str, Path, bool]]:
    """The given trained inputs the run reads: (flag name, path, whether it is a folder of heads); ``t``
    None is the test mode, which reads both ``--saved_path`` and the heads folder."""
    needs = t.needs if t is not None else {"teacher", "heads"}
    given = {"saved_path": cfg.models.saved_path if "teacher" in needs else None,
             "saved_intermediates_directory": cfg.models.heads_dir if "heads" in needs else None}
    if t is not None:
        given.update((f.dest, cfg.flags.get(f.dest)) for f in t.flags if f.dest.startswith("saved_"))
    return [(name, Path(value), name.endswith("_directory")) for name, value in given.items() if value]


def check_needs(t: TrainingType | None, cfg: Settings) -> None:
    """Refuse a command that lacks a trained input it reads: the test mode's model, a type's teacher or heads
    (``TrainingType.needed``: TAKD given a trained assistant reads no teacher)."""
    if t is None and cfg.models.saved_path is None:
        raise UserError("test needs --saved_path (the model to evaluate)")
    needed = t.needed(cfg.flags) if t is not None else frozenset()
    if "teacher" in needed and cfg.models.saved_path is None:
        raise UserError(f"{t.name} needs --saved_path (the trained {cfg.models.teacher} teacher checkpoint)")
    if "heads" in needed and cfg.models.heads_dir is None:
        raise UserError(f"{t.name} needs --saved_intermediates_directory (the heads written by --training_type "
                        "fine_tune)")


def check_inputs(t: TrainingType | None, cfg: Settings) -> None:
    """Refuse trained inputs from their files alone, before any data is read: a teacher of another
    architecture, any model file or heads folder of another class count (built-in datasets), dataset or
    image size, a corrupted file (digest), non-finite weights, a heads folder with strays or a missing or
    extra head; and a missing one: a needed input not given, a path that names nothing."""
    check_needs(t, cfg)
    known = dataload.known_info(cfg.data.dataset)
    classes = known.num_classes if known else None
    teacher = cfg.models.teacher if t is not None else None  # the test mode reads the architecture from the file
    for name, path, is_folder in trained_inputs(t, cfg):
        if is_folder:
            if path.is_file():
                raise UserError(f"--{name} '{path}' is a file, not a folder of heads")
            check_heads_folder(path, teacher, classes, cfg.data.dataset)
            continue
        what = f"--{name} checkpoint" if name != "saved_path" else "teacher checkpoint" if t else "checkpoint"
        arch = teacher if name == "saved_path" else None
        if t is None and name == "saved_path":  # the test mode: a file from other code is a --teacher
            arch = file_arch(path, what, cfg.models.teacher)
        _, meta = read_model_file(path, arch, classes, what, cfg.data.dataset)
        if known and meta.get("image_size") not in (None, known.image_size):
            raise UserError(f"{what} '{path}' was trained on {meta['image_size']}px images, "
                            f"but {known.name} has {known.image_size}px")
