"""``--training_type pipeline``: a teacher, its heads and every requested student method over seeds, one command.

The pipeline's folder (``--path_to_save``, default ``runs/<dataset>_<teacher>_<student>/``) has a fixed layout:

    teacher.pth, teacher.json        the teacher trained with CE on the first seed (absent with --saved_path)
    heads/                           its fine-tuned heads, first seed, when dih is requested (absent with
                                     --saved_intermediates_directory)
    <method>_s<seed>.pth, .json      each student; ``ce`` is the student trained alone
    <method>_s<seed>...              whatever a method writes beside its output (FitNets stage 2 in
                                     ``fitnets_s<seed>_final.pth``, TAKD's assistant in ``takd_s<seed>_ta_<arch>.pth``,
                                     the teacher heads TOFD/MHKD tune in ``<stem>_<method>_teacher_aux/``)
    pipeline.json                    the plan: every step's command and status
    report.md, report.csv            the table of everything finished (``report.py``)
    report_curves_<pair>.png,        its plots: test accuracy per epoch, and by depth (``report.py --plots``)
    report_depth_<pair>.png

Every step is one console run (``final_test.run``, in this process): the pipeline sets the step's
``--training_type``, ``--path_to_save``, ``--saved_path``, ``--saved_intermediates_directory``, ``--seed``
and ``--resume`` (and ``--teacher`` for the teacher and the student trained alone); every other flag of the
pipeline's command reaches every step unchanged. A step whose final result is complete is skipped; a step
that left outputs behind (a checkpoint, a finished first phase) runs with ``--resume``; so a killed
pipeline continues where it stopped when the same command is run again. ``--overwrite`` reruns every step.
The teacher has its own budget and data flags (``--teacher_epochs``, ``--teacher_schedule``,
``--teacher_train_subset``, ``--teacher_label_noise``); ``--concurrent_seeds N`` runs the steps in N worker
processes (``pipeline_workers``).
"""
import json
from dataclasses import dataclass
from pathlib import Path

import report
from dihkit.console.console_flags import default_milestones, resolve_defaults
from dihkit.console.recipe_flags import parse_command
from dihkit.foundations.errors import UserError
from dihkit.foundations.registry import REGISTRY
from dihkit.files.atomic_files import atomic_write_json
from dihkit.results.pipeline_workers import run_steps
from dihkit.runs.run_outputs import RunPaths, console_command, output_exists

# Flags the pipeline sets per step, or that only the pipeline reads; all others are passed through.
OWNED = frozenset({"help", "training_type", "path_to_save", "saved_path", "saved_intermediates_directory", "seed",
                   "resume", "overwrite", "methods", "teacher_epochs", "teacher_schedule", "teacher_train_subset",
                   "teacher_label_noise", "concurrent_seeds"})
MANIFEST = "pipeline.json"


@dataclass(frozen=True)
class Step:
    """One console run of the pipeline."""
    name: str
    training_type: str
    argv: tuple
    output: Path           # the step's --path_to_save
    final: RunPaths        # where the step's final model and result land
    after: tuple = ()      # the names of the steps whose outputs it reads (the teacher, the heads)

    def finished(self) -> bool:
        """The final result is complete and its model is there: nothing to do."""
        return self.final.finished() and output_exists(self.final.final, self.final.is_dir)

    def started(self) -> bool:
        """The step left something behind (a checkpoint, an output, a finished first phase): resume it."""
        stem, folder = self.output.stem if self.output.suffix else self.output.name, self.output.parent
        return self.output.exists() or any(folder.glob(f"{stem}.*")) or any(folder.glob(f"{stem}_*"))


def default_root(args) -> Path:
    """``runs/<dataset>_<teacher>_<student>``."""
    return Path("runs") / f"{args.dataset}_{args.teacher}_{args.student}"


def passthrough(args, parser) -> dict:
    """Every flag of the pipeline's command that was given or differs from its default and is not the pipeline's own,
    as console tokens keyed by destination (so a step can replace one)."""
    flags, given = {}, set(getattr(args, "explicit_flags", ()))
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        # A flag given at its default still reaches the steps: there it beats a recipe's value.
        unchanged = value == action.default and action.dest not in given
        if not action.option_strings or action.dest in OWNED or unchanged or value is None:
            continue
        option = action.option_strings[0]
        if action.nargs == 0:
            flags[action.dest] = [option]
        elif isinstance(value, (list, tuple)):
            flags[action.dest] = [option, *map(str, value)]
        else:
            flags[action.dest] = [option, str(value)]
    return flags


def check_unchanged(step: Step, parser) -> None:
    """Refuse to skip a finished step whose recorded training flags differ from the ones this command gives."""
    recorded = json.loads(step.final.result.read_text()).get("args", {})
    parsed = parse_command(parser, list(step.argv))
    resolve_defaults(parsed)
    current = vars(parsed)
    for key in REGISTRY[step.training_type].result_keys:
        if key in recorded and recorded[key] != current.get(key):
            raise UserError(f"{step.name} finished in '{step.final.result}' with --{key} {recorded[key]!r}, but this "
                            f"command gives {current.get(key)!r}; a pipeline folder holds one configuration: use "
                            f"another --path_to_save (--saved_path reuses the teacher) or pass --overwrite")


def check(args) -> None:
    """Refuse a pipeline command that cannot work, before anything trains."""
    repeated = sorted({m for m in args.methods if args.methods.count(m) > 1})
    if repeated:
        raise UserError(f"--methods lists {repeated[0]} more than once")
    if args.summary:
        raise UserError("--summary prints one model; run it without --training_type pipeline")
    if args.saved_intermediates_directory and not args.saved_path:
        raise UserError("--saved_intermediates_directory needs --saved_path (the teacher those heads belong to)")
    epochs = args.teacher_epochs if args.teacher_epochs is not None else args.epochs
    schedule = args.teacher_schedule or args.schedule or default_milestones(epochs)
    bad = [m for m in schedule if not 0 < m <= epochs]
    if bad and args.saved_path is None:
        flag = "--teacher_schedule" if args.teacher_schedule is not None else "--schedule (give --teacher_schedule)"
        raise UserError(f"{flag} milestone {bad[0]} is outside 1..{epochs}, the teacher's epochs")


def plan(args, parser, root: Path) -> list[Step]:
    """The pipeline's steps in order: teacher, heads, then every method for the first seed, the second..."""
    flags = passthrough(args, parser)

    def step(name: str, training_type: str, output: Path, seed: int, final: RunPaths, after=(), **own) -> Step:
        tokens = {"training_type": ["--training_type", training_type]}
        tokens.update((k, v) for k, v in flags.items() if k not in own)
        tokens.update(own, path_to_save=["--path_to_save", str(output)], seed=["--seed", str(seed)])
        return Step(name, training_type, tuple(t for group in tokens.values() for t in group), output, final,
                    tuple(after))

    first = args.seed[0]
    steps = []
    trained = {}  # what this pipeline trains for its students ("teacher", "heads"): the step's name
    if args.saved_path:
        teacher = Path(args.saved_path)
    else:
        teacher = root / "teacher.pth"
        trained["teacher"] = f"teacher {args.teacher}"
        own = {"teacher": ["--teacher", args.teacher]}
        if args.teacher_epochs is not None:
            own["epochs"] = ["--epochs", str(args.teacher_epochs)]
        if args.teacher_schedule is not None:
            own["schedule"] = ["--schedule", *map(str, args.teacher_schedule)]
        if args.teacher_train_subset is not None:
            own["train_subset"] = ["--train_subset", str(args.teacher_train_subset)]
        if args.teacher_label_noise is not None:
            own["label_noise"] = ["--label_noise", str(args.teacher_label_noise)]
        steps.append(step(trained["teacher"], "ce", teacher, first, RunPaths.for_output(teacher), **own))
    heads = Path(args.saved_intermediates_directory) if args.saved_intermediates_directory else root / "heads"
    if any("heads" in REGISTRY[m].needs for m in args.methods) and not args.saved_intermediates_directory:
        steps.append(step("heads", "fine_tune", heads, first, RunPaths.for_output(heads, is_dir=True),
                          after=trained.values(), saved_path=["--saved_path", str(teacher)]))
        trained["heads"] = "heads"
    for seed in args.seed:
        for method in args.methods:
            t, out = REGISTRY[method], root / f"{method}_s{seed}.pth"
            own = {"teacher": ["--teacher", args.student]} if t.trains == "teacher" else {}
            if "teacher" in t.needs:
                own["saved_path"] = ["--saved_path", str(teacher)]
            if "heads" in t.needs:
                own["saved_intermediates_directory"] = ["--saved_intermediates_directory", str(heads)]
            steps.append(step(f"{method} seed {seed}", method, out, seed, RunPaths.for_output(t.final_output(out)),
                              after=[trained[n] for n in sorted(t.needs) if n in trained], **own))
    return steps


def jobs_to_run(steps: list, finished: set, entries: dict, overwrite: bool) -> list:
    """``(step, argv)`` of every step not ``finished``, resumed when it left something behind; a finished step is
    reported skipped. ``entries``: each step's number and manifest entry, by name."""
    jobs = []
    for s in steps:
        i, entry = entries[s.name]
        if s.name in finished:
            print(f"== [{i}/{len(steps)}] {s.name}: complete, skipped ('{s.final.result}')", flush=True)
            entry["status"] = "complete (skipped)"
        else:
            argv = list(s.argv) + (["--overwrite"] if overwrite else ["--resume"] if s.started() else [])
            entry["command"] = console_command(argv)
            jobs.append((s, argv))
    return jobs


def run_pipeline(args, parser, run_step) -> int:
    """Run every unfinished step with ``run_step(argv, data_cache)`` (the console's ``run``), then the report;
    with ``--concurrent_seeds N`` in N worker processes (``pipeline_workers``)."""
    check(args)
    root = Path(args.path_to_save) if args.path_to_save else default_root(args)
    if root.exists() and not root.is_dir():
        raise UserError(f"--path_to_save '{root}' is a file; the pipeline writes into a folder")
    steps = plan(args, parser, root)
    finished = {s.name for s in steps if not args.overwrite and s.finished()}
    for s in steps:
        if s.name in finished:
            check_unchanged(s, parser)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"kind": report.MANIFEST_KIND, "dataset": args.dataset, "teacher": args.teacher,
                "student": args.student, "methods": args.methods, "seeds": args.seed,
                "steps": [{"name": s.name, "command": console_command(s.argv),
                           "result": str(s.final.result), "status": "pending"} for s in steps]}
    entries = {s.name: (i, entry) for i, (s, entry) in enumerate(zip(steps, manifest["steps"]), start=1)}
    jobs = jobs_to_run(steps, finished, entries, args.overwrite)

    def started(s: Step, log: Path | None = None) -> None:
        i, entry = entries[s.name]
        entry["status"] = "started"
        atomic_write_json(root / MANIFEST, manifest)
        print(f"== [{i}/{len(steps)}] {s.name}: {entry['command']}" + (f" (output in '{log}')" if log else ""),
              flush=True)

    def ended(s: Step) -> None:
        i, entry = entries[s.name]
        entry["status"] = "complete"
        atomic_write_json(root / MANIFEST, manifest)
        print(f"== [{i}/{len(steps)}] {s.name}: done", flush=True)

    if args.concurrent_seeds > 1:
        run_steps(jobs, run_step, args.concurrent_seeds, started, ended)
    else:
        data_cache = {}  # every step reads the same data: load it once
        for s, argv in jobs:
            started(s)
            code = run_step(argv, data_cache)
            if code:
                return code
            ended(s)
    atomic_write_json(root / MANIFEST, manifest)
    print(report.write_report([root], root / "report", plots=True))
    return 0
