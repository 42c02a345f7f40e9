"""Declared options: every value a user can set has a type and a range, checked where it enters.

An :class:`Option` pairs a key with a :class:`Kind` (what is allowed), a default and a meaning.
The same declaration checks a value (:meth:`Option.check`: the error names the key, the value
and what is allowed), reads a command-line flag (:func:`add_option`: the argparse flag, its
``--help`` text) and makes a row of the option tables in docs/options.md
(:func:`markdown_table`). Kinds never accept NaN or infinity, and never take ``True`` for 1.

Where values enter and which declarations check them: command-line flags
(:mod:`vsink.parameters`), recipe YAML and ``KEY=VALUE`` overrides (:mod:`vsink.train.config`),
LVLM mitigation settings and ``--set`` (:mod:`vsink.mitigate`), saved-model metadata
``vsink.json`` (:mod:`vsink.backbones.saved`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import reprlib
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from .errors import VsinkError
from .targets import output_dir_problem, output_file_problem


class OptionError(VsinkError):
    """A value outside what its option allows; the message names the key, the value and what is allowed."""


class Invalid(ValueError):
    """Raised by :meth:`Kind.parse`; the message, if any, adds a reason to the allowed values."""


def shown(value: Any, limit: int = 300) -> str:
    """``repr(value)``, cut to ``limit`` characters (hostile values can be huge, nested too deeply
    for ``repr``, or share parts through YAML aliases so that a full ``repr`` never ends: a value
    expanding to more than ``limit`` parts is shown abbreviated, in bounded time)."""
    if isinstance(value, (Mapping, list, tuple)) and measure(value, nodes=limit)[1] > limit:
        return _short_repr.repr(value)[:limit]
    try:
        text = repr(value)
    except RecursionError:
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: deepest nesting of lists and mappings accepted in a free-form mapping (:class:`Mapping_`)
MAX_DEPTH = 32

#: most values a free-form mapping may hold once expanded (a value shared through YAML aliases
#: counts each time it is reached): nine levels of nine aliases expand to 9**9
MAX_VALUES = 100_000


def _short() -> "reprlib.Repr":
    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxstring, r.maxother = 3, 4, 4, 4, 40, 40
    return r


_short_repr = _short()


def _children(value: Any) -> Iterable[Any]:
    return value.values() if isinstance(value, Mapping) else value


def measure(value: Any, depth: int = MAX_DEPTH, nodes: int = MAX_VALUES) -> tuple[int, int]:
    """(nesting depth, values once expanded) of ``value``, where a scalar has depth 0 and counts
    as one value. Time is linear in the *distinct* lists and mappings (each is measured once,
    memoised by identity), so a YAML alias bomb is measured as quickly as it was parsed. A value
    that contains itself counts as deeper than ``depth`` and larger than ``nodes``; counts stop
    growing once past the limits."""
    container = (Mapping, list, tuple)
    if not isinstance(value, container):
        return 0, 1
    memo: dict[int, tuple[int, int]] = {}
    open_ids: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        v, finished = stack.pop()
        key = id(v)
        if finished:
            open_ids.discard(key)
            d, n = 1, 1
            for c in _children(v):
                cd, cn = memo[id(c)] if isinstance(c, container) else (0, 1)
                d, n = max(d, cd + 1), min(n + cn, nodes + 1)
            memo[key] = (min(d, depth + 1), n)
            continue
        if key in memo:
            continue
        if key in open_ids:  # v is its own descendant
            return depth + 1, nodes + 1
        open_ids.add(key)
        stack.append((v, True))
        stack.extend((c, False) for c in _children(v) if isinstance(c, container) and id(c) not in memo)
    return memo[id(value)]


def nesting_depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply lists and mappings nest in ``value`` (0 for a scalar): :func:`measure`'s depth,
    linear in the distinct parts; stops counting once past ``limit``."""
    return measure(value, depth=limit)[0]


def _number(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


class Kind:
    """What a value may be. ``parse`` returns the value (normalised) or raises :class:`Invalid`;
    ``from_text`` reads the value from a command-line string; ``describe`` says what is allowed."""

    #: the placeholder shown in ``--help`` (None: argparse's default)
    metavar: Optional[str] = None

    def parse(self, value: Any) -> Any:
        raise NotImplementedError

    def from_text(self, text: str) -> Any:
        return self.parse(text)

    def describe(self) -> str:
        raise NotImplementedError


def _bounds(lo: Optional[float], hi: Optional[float], lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{_number(lo)}, {_number(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {_number(lo)}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {_number(hi)}"
    return ""


def _in_bounds(x: float, lo: Optional[float], hi: Optional[float], lo_open: bool, hi_open: bool) -> bool:
    if lo is not None and (x < lo or (lo_open and x == lo)):
        return False
    return not (hi is not None and (x > hi or (hi_open and x == hi)))


@dataclass(frozen=True)
class Int(Kind):
    """An integer (not a bool, not a float) in ``[min, max]``."""

    min: Optional[int] = None
    max: Optional[int] = None
    metavar = "N"

    def parse(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid()
        if not _in_bounds(value, self.min, self.max, False, False):
            raise Invalid()
        return int(value)

    def from_text(self, text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise Invalid() from None
        return self.parse(value)

    def describe(self) -> str:
        return "an integer" + _bounds(self.min, self.max, False, False)


@dataclass(frozen=True)
class Float(Kind):
    """A finite number in a range (ends open or closed); integers are accepted and made floats."""

    min: Optional[float] = None
    max: Optional[float] = None
    min_open: bool = False
    max_open: bool = False
    metavar = "X"

    def parse(self, value: Any) -> float:
        if isinstance(value, bool):
            raise Invalid()
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            return self.from_text(value)
        if not isinstance(value, (int, float)):
            raise Invalid()
        try:
            x = float(value)
        except OverflowError:
            raise Invalid() from None
        if not math.isfinite(x) or not _in_bounds(x, self.min, self.max, self.min_open, self.max_open):
            raise Invalid()
        return x

    def from_text(self, text: str) -> float:
        try:
            x = float(text.strip())
        except ValueError:
            raise Invalid() from None
        return self.parse(x)

    def describe(self) -> str:
        return "a finite number" + _bounds(self.min, self.max, self.min_open, self.max_open)


@dataclass(frozen=True)
class Choice(Kind):
    """One of a fixed set of strings."""

    choices: tuple[str, ...]

    @property
    def metavar(self) -> str:  # type: ignore[override]
        text = "|".join(self.choices)
        return text if len(text) <= 24 else "NAME"

    def parse(self, value: Any) -> str:
        if not isinstance(value, str) or value not in self.choices:
            raise Invalid()
        return value

    def describe(self) -> str:
        return "one of " + ", ".join(self.choices)


@dataclass(frozen=True)
class Text(Kind):
    """A string; ``pattern`` (a full-match regular expression) restricts it, described by ``what``."""

    pattern: Optional[str] = None
    what: str = "text"

    def parse(self, value: Any) -> str:
        if not isinstance(value, str) or (self.pattern is not None and not re.fullmatch(self.pattern, value)):
            raise Invalid()
        return value

    def describe(self) -> str:
        return self.what


@dataclass(frozen=True)
class Bool(Kind):
    """``true`` or ``false`` (a command-line switch: present or not)."""

    def parse(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise Invalid()
        return value

    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class ListOf(Kind):
    """A list of ``item`` values (YAML list; on the command line, comma-separated)."""

    item: Kind
    nonempty: bool = False
    distinct: bool = False
    length: Optional[int] = None

    def parse(self, value: Any) -> list:
        if not isinstance(value, (list, tuple)):
            raise Invalid()
        out = []
        for v in value:
            try:
                out.append(self.item.parse(v))
            except Invalid:
                raise Invalid(f"entry {shown(v)} is not {self.item.describe()}") from None
        self._check(out)
        return out

    def from_text(self, text: str) -> list:
        out = []
        for part in (t.strip() for t in text.split(",")):
            if not part:
                continue
            try:
                out.append(self.item.from_text(part))
            except Invalid:
                raise Invalid(f"entry {shown(part)} is not {self.item.describe()}") from None
        self._check(out)
        return out

    def _check(self, out: list) -> None:
        if self.length is not None and len(out) != self.length:
            raise Invalid(f"{len(out)} entries")
        if self.nonempty and not out:
            raise Invalid("the list is empty")
        if self.distinct and len(set(map(repr, out))) != len(out):
            raise Invalid("an entry repeats")

    @property
    def metavar(self) -> Optional[str]:  # type: ignore[override]
        return f"{self.item.metavar},..." if self.item.metavar else None

    def describe(self) -> str:
        head = f"a list of {self.length} entries" if self.length is not None else (
            "a non-empty list" if self.nonempty else "a list")
        return f"{head}{' of distinct entries' if self.distinct else ''}, each {self.item.describe()}"


@dataclass(frozen=True)
class AnyOf(Kind):
    """A value of any one of ``kinds`` (the first that accepts it)."""

    kinds: tuple[Kind, ...]

    def parse(self, value: Any) -> Any:
        for kind in self.kinds:
            try:
                return kind.parse(value)
            except Invalid:
                continue
        raise Invalid()

    def describe(self) -> str:
        return " or ".join(k.describe() for k in self.kinds)


@dataclass(frozen=True)
class Mapping_(Kind):
    """A mapping with string keys, nested at most :data:`MAX_DEPTH` levels and holding at most
    :data:`MAX_VALUES` values once expanded."""

    def parse(self, value: Any) -> dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise Invalid()
        depth, size = measure(value)
        if depth > MAX_DEPTH:
            raise Invalid(f"nested deeper than {MAX_DEPTH} levels")
        if size > MAX_VALUES:
            raise Invalid(f"more than {MAX_VALUES:,} values once expanded (YAML aliases repeat what they name)")
        return dict(value)

    def describe(self) -> str:
        return "a mapping with string keys"


@dataclass(frozen=True)
class Template(Kind):
    """A ``str.format`` template whose only replacement fields are ``fields`` (literal braces doubled)."""

    fields: tuple[str, ...]

    def parse(self, value: Any) -> str:
        if not isinstance(value, str):
            raise Invalid()
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
        except ValueError as e:
            raise Invalid(str(e)) from None
        bad = [n for n in names if n not in self.fields]
        if bad:
            raise Invalid(f"unknown field {{{bad[0]}}}")
        return value

    def describe(self) -> str:
        return f"text with the field(s) {', '.join('{' + f + '}' for f in self.fields)} (write literal braces as {{{{ }}}})"


@dataclass(frozen=True)
class Threshold(Kind):
    """``auto``, ``sigma:K`` (K a finite number >= 0) or an absolute norm (a finite number > 0)."""

    metavar = "auto|sigma:K|NORM"

    def parse(self, value: Any) -> Any:
        self.detect_kwargs(value)
        return value

    def detect_kwargs(self, value: Any) -> dict[str, Any]:
        """The keyword arguments of :func:`vsink.detect.detect_high_norm` for ``value``."""
        if value is None or value == "auto":
            return {"method": "auto"}
        if isinstance(value, bool):
            raise Invalid()
        if isinstance(value, (int, float)):
            return {"method": "absolute", "threshold": Float(min=0, min_open=True).parse(value)}
        if not isinstance(value, str):
            raise Invalid()
        text = value.strip()
        if text.startswith("sigma:"):
            return {"method": "sigma", "k": Float(min=0).from_text(text.split(":", 1)[1])}
        return {"method": "absolute", "threshold": Float(min=0, min_open=True).from_text(text)}

    def describe(self) -> str:
        return "auto, sigma:K (K a finite number >= 0) or an absolute norm (a finite number > 0)"


@dataclass(frozen=True)
class Assignment(Kind):
    """``KEY=VALUE`` (the value is read as YAML where it is used)."""

    metavar = "KEY=VALUE"

    def parse(self, value: Any) -> str:
        if not isinstance(value, str) or "=" not in value or value.startswith("="):
            raise Invalid()
        return value

    def describe(self) -> str:
        return "KEY=VALUE"


@dataclass(frozen=True)
class InputPath(Kind):
    """An existing ``file``, ``directory`` or ``file or directory`` (``what``)."""

    what: str = "file"

    @property
    def metavar(self) -> str:  # type: ignore[override]
        return {"file": "FILE", "directory": "DIR"}.get(self.what, "PATH")

    def parse(self, value: Any) -> str:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise Invalid()
        p = Path(value)
        ok = (p.is_file() and self.what != "directory") or (p.is_dir() and self.what != "file")
        if not ok:
            if p.is_dir():
                raise Invalid("a directory, not a file")
            if p.exists():
                raise Invalid("not a directory" if p.is_file() else "neither a file nor a directory")
            raise Invalid(f"no such {self.what}")
        return str(value)

    def describe(self) -> str:
        return f"an existing {self.what}"


@dataclass(frozen=True)
class OutputDir(Kind):
    """A directory to write into: an existing writable directory, or one that can be created."""

    metavar = "DIR"

    def parse(self, value: Any) -> str:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise Invalid()
        problem = output_dir_problem(Path(value))
        if problem:
            raise Invalid(problem)
        return str(value)

    def describe(self) -> str:
        return "a writable directory (created if missing)"


@dataclass(frozen=True)
class OutputFile(Kind):
    """A file to write: not a directory, in a writable directory (created if missing)."""

    metavar = "FILE"

    def parse(self, value: Any) -> str:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise Invalid()
        problem = output_file_problem(Path(value))
        if problem:
            raise Invalid(problem)
        return str(value)

    def describe(self) -> str:
        return "a file path in a writable directory"


#: a seed of torch, NumPy and Python's random alike
SEED = Int(0, 2**32 - 1)
#: a file name relative to a folder, staying inside it (no absolute path, no ``..`` component)
RELATIVE_FILE = Text(r"(?![/\\])(?!(.*[/\\])?\.\.([/\\]|$))[^\x00]+", "a file name inside the folder")
#: a torch device
DEVICE = Text(r"cpu|auto|mps|cuda(:\d+)?", "cpu, cuda, cuda:N, mps or auto")


@dataclass(frozen=True)
class Option:
    """One user-settable value: ``key`` (a flag's destination, a recipe key or a setting name),
    what it may be (``kind``; ``nullable``: also null / unset), its default and meaning.

    Command-line only: ``flag`` (default ``--key-with-dashes``), ``positional`` (optional unless
    ``required``), ``repeat`` (given several times, collected in a list; a positional takes any
    number), ``required``, ``metavar`` (the placeholder in ``--help``; default: the kind's, or the
    key for a positional), ``deprecated`` (an old spelling kept for one release: what to write
    instead; using it prints one line on stderr); ``default_text`` describes a default that is not
    a literal value (e.g. "the model's")."""

    key: str
    kind: Kind
    default: Any = None
    help: str = ""
    nullable: bool = False
    default_text: Optional[str] = None
    flag: Optional[str] = None
    positional: bool = False
    repeat: bool = False
    required: bool = False
    metavar: Optional[str] = None
    deprecated: Optional[str] = None

    @property
    def cli_flag(self) -> str:
        return self.key if self.positional else (self.flag or "--" + self.key.replace("_", "-"))

    def allowed(self, cli: bool = False) -> str:
        """What the value may be (``cli``: as a flag, where leaving it out is how to say null)."""
        text = self.kind.describe()
        return f"{text}, or null" if self.nullable and not self.repeat and not cli else text

    def default_shown(self, cli: bool = True) -> str:
        """The default as a user writes it: on the command line, or (``cli=False``) in YAML."""
        if self.default_text is not None:
            return self.default_text
        if isinstance(self.kind, Bool) and cli:
            return "on" if self.default else "off"
        if cli:
            if self.default is None or self.default == []:
                return "none"
            return ",".join(map(str, self.default)) if isinstance(self.default, list) else str(self.default)
        return _yaml(self.default)

    def check(self, value: Any, name: Optional[str] = None, where: str = "") -> Any:
        """``value`` normalised, or an :class:`OptionError` "``where: name must be ALLOWED, got VALUE``"
        (``name`` defaults to ``'key'``)."""
        if value is None and (self.nullable or self.repeat):
            return None
        try:
            if self.repeat:
                if not isinstance(value, (list, tuple)):
                    raise Invalid()
                return [self.kind.parse(v) for v in value]
            return self.kind.parse(value)
        except Invalid as e:
            raise OptionError(error_text(self, value, name or f"'{self.key}'", where, str(e))) from None

    def help_text(self) -> str:
        """``--help`` text: the meaning, what is allowed and the default (``%`` escaped for argparse);
        a deprecated spelling says what replaces it."""
        tail = "required" if self.required else f"default: {self.default_shown()}"
        if isinstance(self.kind, Bool):
            text = f"{self.help} ({tail})" if self.help else tail
        else:
            text = f"{self.help} ({self.allowed(cli=True)}; {tail})" if self.help else f"{self.allowed(cli=True)}; {tail}"
        if self.deprecated:
            text = f"deprecated, removed in the next release: {self.deprecated}. {text}"
        return text.replace("%", "%%")


def _yaml(value: Any) -> str:
    """``value`` in YAML flow style (null, true, [a, b], {k: v})."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


def error_text(option: Option, value: Any, name: str, where: str = "", reason: str = "") -> str:
    """The one-line message for a refused value."""
    why = f" ({reason})" if reason else ""
    return f"{where + ': ' if where else ''}{name} must be {option.allowed()}, got {shown(value)}{why}"


def check_all(options: Mapping[str, Option], values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Check every ``values[key]`` against ``options[key]``; returns the normalised values."""
    return {key: options[key].check(value, where=where) for key, value in values.items()}


def declare(*options: Option) -> dict[str, Option]:
    """Options by key (the order kept), for lookups and tables."""
    out: dict[str, Option] = {}
    for option in options:
        if option.key in out:
            raise ValueError(f"option {option.key!r} declared twice")
        out[option.key] = option
    return out


#: most registers a model may get, trained (``with_registers``, ``registers.n``) or appended at test time
MAX_REGISTERS = 1024

#: options several commands and library functions share
BATCH = Option("batch_size", Int(1), 8, "images per forward pass")
THRESHOLD = Option("threshold", Threshold(), "auto", "high-norm threshold")
NO_PROGRESS = Option("no_progress", Bool(), False, "hide progress bars")


class _Convert:
    """argparse ``type=``: the kind's ``from_text``; a refusal names the value and what is allowed."""

    def __init__(self, option: Option):
        self.option = option
        self.__name__ = option.kind.metavar or "value"

    def __call__(self, text: str) -> Any:
        try:
            return self.option.kind.from_text(text)
        except Invalid as e:
            why = f" ({e})" if str(e) else ""
            raise argparse.ArgumentTypeError(f"must be {self.option.kind.describe()}, got {shown(text)}{why}") from None


def deprecation_text(flag: str, instead: str) -> str:
    """The one line printed when a deprecated spelling is used."""
    return f"vsink: warning: {flag} is deprecated and will be removed in the next release; {instead}"


class _Deprecated(argparse.Action):
    """An old spelling of a flag: stores its value (appends, for a repeatable one) like the flag
    did, and prints :func:`deprecation_text` on stderr the first time it is used."""

    def __init__(self, option_strings: Sequence[str], dest: str, instead: str, append: bool, **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.instead, self.append, self.warned = instead, append, False

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        if not self.warned:
            print(deprecation_text(option_string or self.dest, self.instead), file=sys.stderr)
            self.warned = True
        if self.append:
            values = [*(getattr(namespace, self.dest, None) or []), values]
        setattr(namespace, self.dest, values)


def add_option(parser: argparse.ArgumentParser, option: Option) -> argparse.Action:
    """Add ``option`` to ``parser`` as a flag (or positional) whose type, check and help come from
    the declaration; the action carries the declaration as ``action.option``."""
    kwargs: dict[str, Any] = {"help": option.help_text()}
    if isinstance(option.kind, Bool):
        kwargs.update(action="store_true")
    else:
        kwargs.update(type=_Convert(option), default=option.default)
        metavar = option.metavar or (None if option.positional else option.kind.metavar)
        if metavar:
            kwargs["metavar"] = metavar
        if option.repeat:
            kwargs["action"] = "append" if not option.positional else "store"
            if option.positional:
                kwargs["nargs"] = "*"
        elif option.positional and not option.required:
            kwargs["nargs"] = "?"
        if option.deprecated:
            if option.positional or option.required:
                raise ValueError(f"option {option.key!r}: only an optional flag can be deprecated")
            kwargs.update(action=_Deprecated, instead=option.deprecated, append=option.repeat)
    if option.positional:
        action = parser.add_argument(option.key, **kwargs)
    else:
        if option.required:
            kwargs["required"] = True
        action = parser.add_argument(option.cli_flag, dest=option.key, **kwargs)
    action.option = option  # type: ignore[attr-defined]
    return action


def add_options(parser: argparse.ArgumentParser, *groups: Iterable[Option]) -> None:
    for group in groups:
        for option in (group.values() if isinstance(group, Mapping) else group):
            add_option(parser, option)


def markdown_table(options: Sequence[Option], *, cli: bool = False) -> str:
    """A markdown table of ``options``: name (the flag with ``cli``), allowed values, default, meaning."""
    head = "| flag | allowed | default | meaning |" if cli else "| key | allowed | default | meaning |"
    lines = [head, "| --- | --- | --- | --- |"]
    for o in options:
        name = o.cli_flag if cli else o.key
        if cli and o.repeat:
            name += " ..." if o.positional else " (repeatable)"
        if o.required:
            name += " (required)"
        if o.deprecated:
            name += " (deprecated)"
        allowed = "switch" if cli and isinstance(o.kind, Bool) else o.allowed(cli=cli)
        default = "—" if o.required else o.default_text if o.default_text is not None else f"`{o.default_shown(cli)}`"
        meaning = f"deprecated, removed in the next release: {o.deprecated}. {o.help}" if o.deprecated else o.help
        cells = [f"`{name}`", allowed, default, meaning or ""]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"
