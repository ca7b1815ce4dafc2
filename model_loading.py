"""Registry models for a run: fresh ones, skeletons for sizes, and trained ones loaded and checked."""
import torch
from torch import nn

from checkpoints import load_model_file
from dih_utils import freeze
from errors import UserError
from models_repo import build_model
from run_context import RunContext


def model_meta(ctx: RunContext, arch: str, **extra) -> dict:
    """What a saved model records about itself and its run."""
    return {"arch": arch, "num_classes": ctx.info.num_classes, "dataset": ctx.info.name,
            "image_size": ctx.info.image_size, "training_type": ctx.cfg.training_type, "seed": ctx.seed, **extra}


def new_model(ctx: RunContext, arch: str) -> nn.Module:
    """A freshly initialised registry model for the run's dataset, on the run's device."""
    return build_model(arch, ctx.info.num_classes).to(ctx.device)


def skeleton(ctx: RunContext, arch: str) -> nn.Module:
    """A registry model on the meta device: its structure and size, without memory, time or RNG draws."""
    with torch.device("meta"):
        return build_model(arch, ctx.info.num_classes)


def load_trained(ctx: RunContext, arch: str, path, what: str) -> tuple[nn.Module, dict]:
    """A registry model with weights from ``path``, checked against ``arch`` and the dataset."""
    if path is None:
        raise UserError(f"{what} needs --saved_path (the trained {arch} checkpoint)")
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
