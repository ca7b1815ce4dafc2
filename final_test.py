"""The console: parse, validate, turn the flags into settings, and dispatch ``--training_type``.

Every mistake a user can make ends in one sentence on stderr and exit code 2, before training starts.
The training types come from the registry (``training_types``); the seed loop, the test mode, devices
and the pipeline live in modules of their own.
"""
import sys
from dataclasses import replace
from pathlib import Path

import torch

import dataload
from dihkit.runs import distributed
from dihkit.results import pipeline
import training_types  # noqa: F401  (fills the registry)
from dihkit.console.console_flags import build_parser, resolve_defaults
from dihkit.console.model_names import resolve_models
from dihkit.foundations.recipes import DIH_MILESTONES
from dihkit.console.recipe_flags import parse_command
from dihkit.console.devices import configure_backends, resolve_device, resolve_speed, settle_data_path
from dihkit.runs.distributed import from_env
from dihkit.foundations.errors import UserError
from dihkit.console.evaluate_checkpoint import evaluate_saved
from dihkit.foundations.flags import check_ranges
from dihkit.console.model_summary import summarize
from dihkit.foundations.registry import REGISTRY
from dihkit.runs.run_outputs import check_output_text, console_command
from dihkit.runs.run_state import Interrupted
from dihkit.console.concurrent_seeds import run_concurrently
from dihkit.console.seed_runs import check_before_data, default_output, print_summary, run_seeds, seed_outputs
from dihkit.foundations.settings import Settings, settings_from_flags, with_resolved
from train_funcs import NonFiniteLoss


def validate(args, parser) -> None:
    """Check every value against its declared range and the flags against each other, before any work."""
    problem = check_ranges(parser, args)
    if problem:
        raise UserError(problem)
    check_output_text(args.path_to_save)
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other: --resume continues the interrupted run, "
                        "--overwrite starts over")
    bad = [m for m in args.schedule or () if m > args.epochs]
    if bad:
        raise UserError(f"--schedule milestone {bad[0]} is outside 1..{args.epochs} (--epochs); leave --schedule out "
                        f"for milestones at {', '.join(f'{m / DIH_MILESTONES.of:.0%}' for m in DIH_MILESTONES.at)} of --epochs")


def make_settings(args) -> Settings:
    """The typed settings of a (non-pipeline) command, its defaults that depend on other flags filled in."""
    resolve_defaults(args)
    t = REGISTRY.get(args.training_type)
    if t is None:  # the test mode: no training type's own settings
        return settings_from_flags(vars(args))
    return settings_from_flags(vars(args), t.settings)


def on_this_machine(cfg: Settings, gpu_id: str | None, dist) -> tuple[Settings, torch.device]:
    """The run's device, and ``cfg`` with ``auto`` precision and memory format resolved for it, its flags
    recording what they resolved to (a resume compares those); the first line of output says which."""
    distributed.check_devices(dist, gpu_id)
    device = resolve_device(gpu_id, dist.local_rank)
    configure_backends(cfg.run.deterministic)
    run_cfg = resolve_speed(cfg.run, device)
    if dist.is_main:
        print(f"precision: {run_cfg.speed_reason}", flush=True)
        if run_cfg.amp and run_cfg.eval_precision == "fp32":
            print("evaluation: float32 (--eval_precision bf16 evaluates in bfloat16)", flush=True)
    return with_resolved(replace(cfg, run=run_cfg), precision=run_cfg.precision,
                         memory_format=run_cfg.memory_format), device


def with_data_path(cfg: Settings, data: dataload.DataBundle, device: torch.device, dist) -> Settings:
    """``cfg`` with the data path and loader workers settled the same on every rank (``settle_data_path``: the
    data paths draw differently from the shared data generator), its flags recording the path; rank 0 prints
    which path runs and why."""
    data_cfg, line = settle_data_path(cfg.data, data, device, dist)
    if dist.is_main:
        print(line, flush=True)
    return with_resolved(replace(cfg, data=data_cfg), data_path=data_cfg.data_path)


def load_data(cfg: Settings, data_cache: dict | None, dist) -> dataload.DataBundle:
    """The command's dataset, from ``data_cache`` (the pipeline's steps share one load) when it holds it.

    An image folder is streamed when its decoded images exceed the memory budget of each of the node's processes.
    """
    d = cfg.data
    stream = {"auto": "auto", "stream": "yes"}.get(d.data_path, "no")
    key = (d.dataset, d.data_dir, d.val_size, d.train_subset, d.label_noise, stream, d.crop_size)
    data = data_cache.get(key) if data_cache is not None else None
    if data is None:
        # A resume may be on other data: their decode cache is written once its checks pass (train_funcs).
        data = dataload.load_data(d.dataset, d.data_dir, d.val_size, train_subset=d.train_subset,
                                  cache_dir=d.cache_dir, cache_read_only=cfg.run.resume, stream=stream,
                                  crop_size=d.crop_size, budget=dataload.memory_budget(dist.local_world_size),
                                  label_noise=d.label_noise)
        if data_cache is not None:
            data_cache[key] = data
    return replace(data, info=dataload.normalized(data.info, d.normalization))


def run(argv=None, data_cache: dict | None = None) -> int:
    """Parse, validate, load the data once, and run each seed; return the exit code.

    ``data_cache``: datasets already loaded, by their flags, shared by the runs of one pipeline.
    """
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    args = parse_command(parser, argv, resolve_models)
    validate(args, parser)
    if args.training_type == "pipeline":
        return pipeline.run_pipeline(args, parser, run)
    dist = from_env()
    cfg, device = on_this_machine(replace(make_settings(args), command=console_command(argv)), args.gpu_id, dist)
    t = REGISTRY.get(cfg.training_type)
    if args.summary:
        trains_teacher = t is None or t.trains == "teacher"
        summarize(cfg.models.teacher if trains_teacher else cfg.models.student, cfg.data.dataset,
                  cfg.data.data_dir, device, cfg.data.crop_size)
        return 0
    seeds = args.seed if t is not None else args.seed[:1]
    out = Path(args.path_to_save) if args.path_to_save else (
        default_output(t, cfg.models.teacher, cfg.models.student) if t else Path("."))
    outputs = seed_outputs(out, seeds, t.output_is_dir) if t else [(seeds[0], out)]
    claim = check_before_data(t, cfg, outputs, dist)
    if args.concurrent_seeds > 1 and len(outputs) > 1:
        if dist.enabled:
            raise UserError("--concurrent_seeds starts processes of its own; launch it without torchrun")
        print_summary(run_concurrently(t, argv, outputs, args.concurrent_seeds), seeds)
        return 0
    data = load_data(cfg, data_cache, dist)
    distributed.check_world(dist, data, cfg.data.batch_size, device, cfg.run.sync_bn)
    # Claimed before the process group forms: rank 0 refused there exits, and torchrun stops the other ranks.
    with claim, distributed.process_group(dist, device, args.dist_timeout):
        run_seeds(t.run if t else evaluate_saved, with_data_path(cfg, data, device, dist), outputs, dist, device, data)
    return 0


def main_as(training_type: str, argv, prog: str) -> int:
    """Entry of a per-method script (e.g. ``CRD/train_student.py``): the console with a fixed training type.

    A ``--training_type`` in ``argv`` naming another type is refused rather than silently overriding.
    """
    probe = build_parser(prog)
    probe.set_defaults(training_type=None)
    given = probe.parse_known_args(argv)[0].training_type
    if given not in (None, training_type):
        print(f"error: {prog} trains --training_type {training_type}, not {given}; drop --training_type "
              f"or use final_test.py --training_type {given}", file=sys.stderr)
        return 2
    return main(["--training_type", training_type, *argv])


def main(argv=None) -> int:
    """Console entry: user errors become one line on stderr and exit code 2."""
    try:
        return run(argv)
    except UserError as e:
        # An error all ranks raised together is reported once, by rank 0.
        if not isinstance(e, distributed.SharedUserError) or from_env().is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted: stopped at once; the checkpoint of the last finished epoch (if any) is kept: rerun the "
              "same command with --resume", file=sys.stderr)
        return 130
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
