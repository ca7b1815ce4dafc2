"""``--recipe`` and the separate CE/KD weights: the flags, and how a recipe fills the flags a user did not give.

A recipe (``dihkit/foundations/recipes.py``, docs/RECIPES.md) sets values for the run's training type and
teacher/student pair; a flag on the command line always wins. The run records the recipe and, in
``recipe_values``, every value it set with its source; ``explicit_flags`` lists the flags the user gave.
"""
import argparse

from dihkit.foundations.errors import UserError
from dihkit.foundations.flags import Range, flag
from dihkit.foundations.recipes import DEFAULT_RECIPE, RECIPES, resolve
from dihkit.foundations.registry import REGISTRY

# The training types whose KD term takes --ce_weight/--kd_weight (their result depends on them).
WEIGHTED_TYPES = ("kd", "dih", "takd", "fitnets", "mhkd")
WEIGHTS = ("ce_weight", "kd_weight")

RECIPE_FLAGS = (
    flag("--recipe", nargs="+", default=[DEFAULT_RECIPE], choices=list(RECIPES), metavar="NAME",
         help="published settings that fill every flag not given (a later recipe's value replaces an earlier "
              "one's; values per training type and model pair; docs/RECIPES.md): " + "; ".join(
                  f"{r.name}: {r.summary}" for r in RECIPES.values())),
    flag("--ce_weight", type=float, default=None, range=Range(0),
         help="weight of CE beside --kd_weight, replacing --kd_alpha's pair (alpha, 1 - alpha) in the KD term of "
              f"{', '.join(WEIGHTED_TYPES)} (mdistiller's KD: 0.1 and 0.9; logit standardisation's: 0.1 and 9); "
              "give both or neither (default: none)"),
    flag("--kd_weight", type=float, default=None, range=Range(0),
         help="weight of the distillation term T^2 KL beside --ce_weight (default: none)"),
)


def explicit_flags(parser: argparse.ArgumentParser, argv: list) -> set:
    """The destinations of the flags given on the command line ``argv`` (a flag set to its default counts)."""
    unset = object()
    probe = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=probe)
    return {dest for dest, value in vars(probe).items() if value is not unset}


def apply_recipe(args, given: set) -> None:
    """Fill, in place, every flag the recipes set for this run that is not in ``given``; record what was set.

    The milestones of a recipe are scaled to the run's epochs. ``--kd_alpha`` given keeps a recipe's CE/KD
    weights out: the user asked for the convex form.
    """
    t = REGISTRY.get(args.training_type)
    # A type that trains the --teacher model (ce) takes the student rules for it (RepDistiller's train_teacher.py).
    trained = args.teacher if t is not None and t.trains == "teacher" else args.student
    values = resolve(args.recipe, args.training_type, args.teacher, trained, args.val_size)
    skip = set(given) | (set(WEIGHTS) if "kd_alpha" in given else set())
    applied = {}
    for dest, r in values.items():
        if dest in skip or dest == "schedule":
            continue
        setattr(args, dest, r.value)
        applied[dest] = {"value": r.value, "recipe": r.recipe, "source": r.source}
    if "schedule" in values and "schedule" not in given:
        r = values["schedule"]
        args.schedule = r.value.scaled(args.epochs)
        applied["schedule"] = {"value": args.schedule, "recipe": r.recipe, "source": r.source}
    args.recipe_values = applied
    args.explicit_flags = sorted(given)


def check_weights(args) -> None:
    """Refuse contradictory loss weights, before any data."""
    if "kd_alpha" in args.explicit_flags and any(getattr(args, w) is not None for w in WEIGHTS):
        raise UserError("--kd_alpha contradicts --ce_weight/--kd_weight: give either --kd_alpha (KD weight alpha, "
                        "CE weight 1 - alpha) or both --ce_weight and --kd_weight")
    if (args.ce_weight is None) != (args.kd_weight is None):
        missing = "--kd_weight" if args.kd_weight is None else "--ce_weight"
        raise UserError(f"--ce_weight and --kd_weight go together: {missing} is missing")


def parse_command(parser: argparse.ArgumentParser, argv: list, resolve_models=None):
    """Parse ``argv``; ``resolve_models(args)``, when given, settles the architectures (a teacher read from
    its file) before the recipes, whose per-pair values follow them; for a training command (not the
    pipeline, whose steps resolve their own) apply the recipes and check the loss weights."""
    args = parser.parse_args(argv)
    if resolve_models is not None:
        resolve_models(args)
    given = explicit_flags(parser, argv)
    args.explicit_flags = sorted(given)
    if args.training_type != "pipeline":
        apply_recipe(args, given)
        check_weights(args)
    return args
