"""What a training type declares about itself, and the one dict that holds them (filled by ``training_types``).

The console, the pipeline, the report and the bench read ``REGISTRY``; nothing else lists training types.
A training type is one module that defines a ``TrainingType`` plus one line in ``training_types.py``.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Flags every training type's result depends on (the data, the recipe, the global batch).
RECIPE_KEYS = ("training_type", "dataset", "val_size", "train_subset", "label_noise", "lr", "wd", "momentum",
               "nesterov", "schedule", "schedule_gamma", "epochs", "batch_size", "scale_lr", "sync_bn",
               "normalization", "crop_padding", "crop_size")
# What a distilled student's result depends on beyond the recipe.
STUDENT_KEYS = ("teacher", "student", "kd_alpha", "kd_temperature")
# The KD term's separate weights (--ce_weight/--kd_weight), for the types whose KD term takes them.
WEIGHT_KEYS = ("ce_weight", "kd_weight")


def only_output(out: Path, flags) -> list:
    """The outputs of a single-phase type: its model file."""
    return [(Path(out), False)]


def same_path(out: Path) -> Path:
    """The final model of a single-phase type is its output itself."""
    return Path(out)


@dataclass(frozen=True)
class TrainingType:
    """One training type: how to run it and everything the console, pipeline, report and bench need to know."""
    name: str
    run: Callable                        # run(ctx: RunContext) -> result record of its final phase
    summary: str                         # one line: what it trains (help, README table)
    depends_on: tuple = ()               # flags beyond RECIPE_KEYS that change its result
    flags: tuple = ()                    # its own console flags (flags.Flag), in a group named after it
    settings: type | None = None         # frozen dataclass of its own flag values (RunContext.cfg.method)
    description: str = ""                # its help group's description
    trains: str = "student"              # "teacher": the model named by --teacher (ce, fine_tune)
    output_is_dir: bool = False          # writes a folder of heads rather than one model file
    outputs: Callable = only_output      # outputs(out, flags) -> [(path, is_dir)] of every phase
    final_output: Callable = same_path   # where its final model lands, from --path_to_save
    final_phase: str | None = None       # the phase holding its final result, when not named after the type
    also_final: tuple = ()               # phases of the type's other forms that hold a final result too
    needs: frozenset = frozenset()       # {"teacher", "heads"}: the trained inputs the pipeline must pass
    needs_for: Callable | None = None    # needs_for(flags) -> what one command reads, when its flags decide
                                         # (TAKD given a trained assistant reads no teacher); default: needs
    pre_data_check: Callable | None = None  # pre_data_check(cfg: Settings): refuses what the flags alone show
                                            # (stage counts, layers, sizes); the console runs it before any data
    in_pipeline: bool = True             # can be a pipeline method
    same_stages: bool = False            # pairs teacher and student stage by stage (equal stage counts)
    frozen_reference: bool = False       # its record's reference_test measures the run's --saved_path teacher
                                         # (and --saved_intermediates_directory heads), for the report
    report_order: int = 100
    label: Callable | None = None        # label(recorded flags) -> the objective's name in reports
    bench: Callable | None = None        # bench(parts: bench.BenchParts) -> Method for one timed step
    flag_defaults: dict = field(default_factory=dict)  # its own defaults for shared flags (kd_alpha, beta, ...)

    @property
    def result_keys(self) -> tuple:
        """Every flag whose value changes what this type trains (resume and pipeline staleness checks)."""
        return RECIPE_KEYS + tuple(k for k in self.depends_on if k not in RECIPE_KEYS)

    def needed(self, flags) -> frozenset:
        """The trained inputs a command with ``flags`` reads (the console refuses one without them)."""
        return self.needs_for(flags) if self.needs_for else self.needs

    @property
    def final_phase_name(self) -> str:
        """The phase whose result is the type's result."""
        return self.final_phase or self.name

    def report_label(self, flags) -> str:
        """The name a report prints for a run with the recorded ``flags``."""
        return self.label(flags) if self.label else self.name


REGISTRY: dict[str, TrainingType] = {}


def register(training_type: TrainingType) -> TrainingType:
    """Add a training type (a name may be registered once)."""
    if training_type.name in REGISTRY:
        raise ValueError(f"training type {training_type.name} is registered twice")
    REGISTRY[training_type.name] = training_type
    return training_type


def ordered() -> list[TrainingType]:
    """The registered types in report order."""
    return sorted(REGISTRY.values(), key=lambda t: (t.report_order, t.name))
