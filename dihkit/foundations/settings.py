"""Typed, frozen settings built once from the parsed flags; code below the console reads these, never argparse.

``Settings.flags`` keeps every flag's value as a plain dict (``auto`` values as the console resolved them):
result and resume files record it, and a resume compares it with the earlier run's.
"""
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType


@dataclass(frozen=True)
class OptimSettings:
    """SGD and MultiStepLR settings of one training phase."""
    epochs: int
    lr: float
    wd: float
    milestones: tuple
    gamma: float
    momentum: float = 0.9
    nesterov: bool = True


@dataclass(frozen=True)
class DataSettings:
    """Which data, and how batches are made.

    ``num_workers`` is None until the console resolves it for the run's data path (``devices``).
    """
    dataset: str
    data_dir: str
    val_size: int
    train_subset: int
    batch_size: int
    num_workers: int | None
    data_path: str
    cache_dir: str | None = None
    normalization: str = "dih"           # the mean/std table (dataload.NORMALIZATIONS)
    crop_padding: str = "zeros"          # the random crop's padding (dataload.PADDINGS)
    prefetch_factor: int = 2
    persistent_workers: bool = True
    crop_size: int | None = None          # the streamed crop (None: the dataset's default)
    label_noise: float = 0.0              # the share of training labels moved to another class

    def loader_options(self) -> dict:
        """The DataLoader settings the batch iterators take (``dataload.train_batches``, ``eval_batches``)."""
        return {"num_workers": self.num_workers or 0, "prefetch_factor": self.prefetch_factor,
                "persistent_workers": self.persistent_workers}


@dataclass(frozen=True)
class RunSettings:
    """How a run behaves: resume and overwrite, non-finite losses, speed switches, multi-GPU options.

    ``precision`` and ``memory_format`` are the flags' values until the console resolves ``auto`` for the
    run's device (``devices.resolve_speed``), which also says why in ``speed_reason``.
    """
    resume: bool = False
    overwrite: bool = False
    nan_policy: str = "stop"
    precision: str = "fp32"              # fp32 or bf16 (bfloat16 autocast); auto before resolution
    eval_precision: str = "fp32"         # evaluation's: fp32 whatever the training's, or bf16 (autocast)
    memory_format: str = "contiguous"    # contiguous or channels_last; auto before resolution
    speed_reason: str = ""
    fold: bool = True                    # fold the frozen cohort's batch norms (the bench turns it off)
    compile: bool = False
    deterministic: bool = False
    scale_lr: bool = False
    sync_bn: bool = False

    @property
    def amp(self) -> bool:
        """Whether the run computes under bfloat16 autocast."""
        return self.precision == "bf16"

    @property
    def channels_last(self) -> bool:
        """Whether models and inputs are channels-last."""
        return self.memory_format == "channels_last"


@dataclass(frozen=True)
class ModelSettings:
    """The models of a run, their trained inputs, and the distillation weights every KD term uses."""
    teacher: str
    student: str
    saved_path: str | None = None
    heads_dir: str | None = None          # --saved_intermediates_directory
    kd_alpha: float = 0.1
    kd_temperature: float = 5.0
    ce_weight: float | None = None        # with kd_weight: the KD term's weights instead of (alpha, 1 - alpha)
    kd_weight: float | None = None

    def kd_weights(self) -> tuple:
        """The KD term's (distillation weight, CE weight): ``--kd_weight``/``--ce_weight`` when given, else
        ``--kd_alpha``'s convex pair (alpha, 1 - alpha)."""
        if self.ce_weight is not None:
            return self.kd_weight, self.ce_weight
        return self.kd_alpha, 1.0 - self.kd_alpha


@dataclass(frozen=True)
class Settings:
    """Everything one command asks for, typed; ``method`` holds the training type's own settings."""
    training_type: str
    run: RunSettings
    data: DataSettings
    optim: OptimSettings
    models: ModelSettings
    method: object = None
    flags: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    command: str = ""                     # the console command line (run_outputs.console_command) result files record


def pick(cls, values: dict, **renamed):
    """An instance of the dataclass ``cls`` from ``values`` by field name (``renamed``: field -> flag)."""
    return cls(**{f.name: values[renamed.get(f.name, f.name)] for f in fields(cls)
                  if renamed.get(f.name, f.name) in values})


def settings_from_flags(values: dict, method_settings=None) -> Settings:
    """Settings from a dict of flag values (``vars`` of the console's namespace, milestones resolved)."""
    optim = OptimSettings(values["epochs"], values["lr"], values["wd"], tuple(values["schedule"]),
                          values["schedule_gamma"], values["momentum"], values["nesterov"])
    method = pick(method_settings, values) if method_settings is not None else None
    return Settings(values["training_type"], pick(RunSettings, values), pick(DataSettings, values), optim,
                    pick(ModelSettings, values, heads_dir="saved_intermediates_directory"), method,
                    MappingProxyType(dict(values)))


def with_resolved(cfg: Settings, **values) -> Settings:
    """``cfg`` whose flags record ``values``, what ``auto`` flags resolved to on this machine: result files and
    a resume's checks then see what ran."""
    return replace(cfg, flags=MappingProxyType({**cfg.flags, **values}))
