"""Console flags as data: each flag declares its argparse settings and, when it is a number, its range.

Every numeric flag must carry a ``Range``; the console checks every value against it before anything is
loaded, so ``inf``, ``nan`` and out-of-range values end in one sentence (``check_ranges``).
"""
import argparse
import difflib
import math
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Range:
    """The values a numeric flag accepts (every element, for a list flag); numbers must be finite."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False           # True: lo itself is refused
    hi_open: bool = False
    increasing: bool = False        # a list whose values must strictly increase (milestones)
    distinct: bool = False          # a list without repeats (seeds)

    def describe(self, integer: bool = False) -> str:
        """The range in words, e.g. 'a finite number > 0' or 'an integer >= 1'."""
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return ("an integer" if integer else "a finite number") + (" " + " and ".join(parts) if parts else "")

    def problem(self, value) -> str | None:
        """Why ``value`` (a number or a list of numbers) is refused, or None."""
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in values:
            integer = isinstance(v, int)
            if not integer and not math.isfinite(v):
                return f"must be {self.describe()}, got {v}"
            low = self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)
            high = self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi)
            if low or high:
                return f"must be {self.describe(integer)}, got {v:g}"
        if self.increasing and any(b <= a for a, b in zip(values, values[1:])):
            return f"must strictly increase, got {' '.join(f'{v:g}' for v in values)}"
        if self.distinct and len(set(values)) != len(values):
            return f"must be distinct, got {' '.join(f'{v:g}' for v in values)}"
        return None


@dataclass(frozen=True)
class Flag:
    """One console flag: its option strings, argparse keywords and (numbers only) its range."""
    names: tuple
    options: dict = field(default_factory=dict)
    range: Range | None = None

    @property
    def dest(self) -> str:
        """The namespace attribute the flag sets."""
        return self.options.get("dest", self.names[0].lstrip("-").replace("-", "_"))


def flag(*names: str, range: Range | None = None, **options) -> Flag:
    """Declare a flag: ``flag("--lr", type=float, default=0.1, range=Range(0, lo_open=True), help=...)``."""
    return Flag(tuple(names), options, range)


def parse_bool(text: str) -> bool:
    """Parse True/False, 1/0, yes/no (any case); anything else is an error."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False, 1/0 or yes/no, got '{text}'")


# How argparse starts its message for flags no parser declares.
UNRECOGNIZED = "unrecognized arguments: "
# argparse's refusal of a value outside a flag's choices: ``argument --recipe: invalid choice: 'dkdd' (...)``.
INVALID_CHOICE = re.compile(r"argument (?P<flag>[^:]+): invalid choice: '(?P<value>[^']*)'")


class Unset(str):
    """A flag's default value, told apart from the same value typed on the command line (``given``): the
    console may then replace it with what an input file records."""


def given(args, dest: str) -> bool:
    """Whether flag ``dest`` was typed on the command line (its default is an ``Unset``)."""
    return not isinstance(getattr(args, dest), Unset)


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit code 2."""

    def error(self, message):
        """Print one sentence and exit 2 (argparse would also print the whole usage)."""
        self.exit(2, f"{self.prog}: error: {message}{self.suggestions(message)}\n")

    def suggestions(self, message: str) -> str:
        """For argparse's ``unrecognized arguments`` message, the known flags closest to each unknown one:
        ``; did you mean --temperature?``; for an ``invalid choice``, the closest choices (``choice_hint``);
        empty when none is close."""
        if not message.startswith(UNRECOGNIZED):
            return self.choice_hint(message)
        owner = {option: action for action in self._actions for option in action.option_strings}
        unknown = [word.split("=")[0] for word in message[len(UNRECOGNIZED):].split() if word.startswith("--")]
        hints = []
        for word in unknown:
            close = []
            for option in difflib.get_close_matches(word, owner, n=4, cutoff=0.6):
                # Each flag once, by its closest spelling: --temperature, not also its alias --kd_temperature.
                if all(owner[option] is not owner[c] for c in close):
                    close.append(option)
            close = close[:2]
            if close:
                hints.append(("" if len(unknown) == 1 else f"for {word}, ") + f"did you mean {' or '.join(close)}?")
        return "".join(f"; {hint}" for hint in hints)

    def choice_hint(self, message: str) -> str:
        """For argparse's ``invalid choice`` message, the flag's choices closest to the value typed, as a
        mistyped flag gets them: ``--recipe dkdd`` -> ``; did you mean dkd?``."""
        found = INVALID_CHOICE.match(message)
        action = found and next((a for a in self._actions if found["flag"].split("/")[0] in a.option_strings), None)
        if not action or not action.choices:
            return ""
        close = difflib.get_close_matches(found["value"], [str(c) for c in action.choices], n=2, cutoff=0.6)
        return f"; did you mean {' or '.join(close)}?" if close else ""


class HelpFormatter(argparse.HelpFormatter):
    """Shows every flag's default once: appended unless the help already states it. In a description, a line
    indented by two spaces (an example command) is kept as it is; the other lines are filled."""

    def _fill_text(self, text, width, indent):
        return "\n".join(indent + line if line.startswith("  ") else super(HelpFormatter, self)._fill_text(
            line, width, indent) for line in text.splitlines())

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.nargs == 0:
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{text} (default: {default})"


def add_flags(group, flags) -> None:
    """Add ``flags`` to an argparse group; a numeric flag without a range is a programming error."""
    for f in flags:
        numeric = f.options.get("type") in (int, float)
        if numeric and f.range is None:
            raise TypeError(f"flag {f.names[0]} is numeric but declares no Range")
        action = group.add_argument(*f.names, **f.options)
        action.range = f.range


def check_ranges(parser: argparse.ArgumentParser, namespace) -> str | None:
    """The first flag value outside its declared range, as a sentence; None when all are in range."""
    for action in parser._actions:
        rng = getattr(action, "range", None)
        value = getattr(namespace, action.dest, None)
        if rng is None or value is None:
            continue
        problem = rng.problem(value)
        if problem:
            return f"{'/'.join(action.option_strings)} {problem}"
    return None
