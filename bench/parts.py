"""What the bench times, read from the registry, and the parts each training type's ``bench`` builds from.

A training type is timed when it declares ``bench(parts) -> Method`` (``registry.TrainingType``); its
``parts.cfg`` is the ``Settings`` the console builds for ``--training_type <name>`` with its default flags
(per-type defaults such as TOFD's included) plus the bench's models, dataset, batch size and speed flags.
The bench spells out only the types its figures are defined on (below); everything else comes from here.
"""
from dataclasses import dataclass, replace

import torch
from torch import nn

from dihkit.console import console_flags
from dihkit.console.devices import resolve_speed
import final_test
import training_types  # noqa: F401  (fills the registry)
from dih_utils import Cohort, build_heads, freeze
from models_repo import build_model
from dihkit.foundations.registry import REGISTRY, ordered
from dihkit.foundations.settings import Settings

# (classes, image size, training images) of the datasets whose shape the generated data takes.
SHAPES = {"cifar10": (10, 32, 50_000), "cifar100": (100, 32, 50_000), "tiny-imagenet": (200, 64, 100_000)}
# The training types the figures are defined on: the floor is the frozen cohort's inference plus the
# FLOOR_STEP (the student's own CE step); FINE_TUNE is compared with the teacher's inference; DIH with
# the authors' DIH step (and its epoch gives the projection of the full recipe).
FLOOR_STEP = "ce"
FINE_TUNE = "fine_tune"
DIH = "dih"
# The name of the authors'-style DIH step in the results (bench/authors_dih.py).
AUTHORS_DIH = "dih_original"


def bench_types() -> list[str]:
    """The registered training types that can be timed (those with a ``bench``), in report order."""
    return [t.name for t in ordered() if t.bench is not None]


def frozen_on(module: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``module`` on ``device`` (channels-last when asked) and frozen, as the console's loaders leave a teacher."""
    module.to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return freeze(module)


@dataclass(frozen=True)
class BenchParts:
    """What a training type's ``bench`` builds its one timed step from.

    Models are randomly initialised: weights do not change the cost. ``teacher`` and ``heads`` are shared by
    every type (frozen, on the device, in the run's memory format); ``student()`` is a fresh one.
    """
    cfg: Settings                 # the console's settings for this training type
    device: torch.device
    teacher: nn.Module            # frozen
    heads: nn.ModuleList          # frozen DIH heads on ``teacher``
    classes: int
    size: int                     # image size
    n_dataset: int                # training images of the real dataset (CRD's memory banks)

    def student(self) -> nn.Module:
        """A fresh student (``cfg.models.student``) on the device."""
        return build_model(self.cfg.models.student, self.classes).to(self.device)

    def frozen(self, module: nn.Module) -> nn.Module:
        """``module`` moved to the device (and channels-last when asked), frozen."""
        return frozen_on(module, self.device, self.cfg.run.channels_last)


def type_settings(opts, name: str, data_path: str = "device", epochs: int | None = None) -> Settings:
    """The console's settings for ``--training_type name`` with the bench's models, data and speed flags.

    ``epochs``: a one-epoch recipe for the timed epochs (the schedule follows it); else the console's default.
    """
    argv = ["--training_type", name, "--teacher", opts.teacher, "--student", opts.student, "--dataset", opts.dataset,
            "--batch_size", str(opts.batch_size), "--gpu_id", opts.device, "--seed", "0",
            "--num_workers", str(opts.num_workers), "--data_path", data_path, "--no_cache"]
    if epochs is not None:
        argv += ["--epochs", str(epochs)]
    argv += ["--precision", opts.precision, "--memory_format", opts.memory_format] + ["--compile"] * opts.compile
    cfg = final_test.make_settings(console_flags.build_parser().parse_args(argv))
    # As the console resolves auto for the device; folding is on unless the bench is told otherwise.
    return replace(cfg, run=replace(resolve_speed(cfg.run, torch.device(opts.device)), fold=not opts.no_fold))


def shared_parts(opts, device: torch.device) -> BenchParts:
    """The frozen teacher and heads every type shares, with the floor step's settings."""
    classes, size, n_dataset = SHAPES[opts.dataset]
    cfg = type_settings(opts, FLOOR_STEP)
    teacher = frozen_on(build_model(opts.teacher, classes), device, cfg.run.channels_last)
    heads = frozen_on(build_heads(teacher, classes, size), device, cfg.run.channels_last)
    return BenchParts(cfg, device, teacher, heads, classes, size, n_dataset)


def stage_mismatch(opts, parts: BenchParts) -> bool:
    """Whether teacher and student differ in stage count (types with ``same_stages`` cannot pair them)."""
    return parts.teacher.num_stages != build_model(opts.student, parts.classes).num_stages


def build_methods(opts, device: torch.device, authors_step) -> tuple[dict, dict, dict, list]:
    """Every timed method (name -> Method) built by its type's ``bench``, the settings each runs under, the
    frozen cohorts of the inference tasks, and the types skipped for a stage-count mismatch.

    The floor step always runs; ``authors_step(parts)`` builds the authors' DIH step when DIH is timed (None:
    not built). The inference cohorts are returned as built: ``train_funcs.prepare_cohort`` readies them.
    """
    base = shared_parts(opts, device)
    wanted = [FLOOR_STEP] + [m for m in opts.methods if m != FLOOR_STEP]
    mismatch = stage_mismatch(opts, base)
    skipped = [m for m in wanted if REGISTRY[m].same_stages and mismatch]
    parts = {name: replace(base, cfg=type_settings(opts, name)) for name in wanted if name not in skipped}
    methods = {name: REGISTRY[name].bench(p) for name, p in parts.items()}
    settings = {name: p.cfg for name, p in parts.items()}
    if DIH in methods and authors_step is not None:
        methods[AUTHORS_DIH] = authors_step(parts[DIH])
        settings[AUTHORS_DIH] = parts[DIH].cfg
    cohorts = {"teacher": Cohort(base.teacher), "teacher_and_heads": Cohort(base.teacher, base.heads)}
    return methods, settings, cohorts, skipped
