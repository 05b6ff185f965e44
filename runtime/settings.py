"""Settings declared once. Each option of a console script is a dataclass
field whose metadata (`option(...)`) names its help; the flag (`--field-name`),
the environment variable (`PREFIX_FIELD_NAME`), argparse, `--help`, the
systemd env files and the settings reference in docs/ all come from, or are
checked against, that one declaration (tests/runtime/test_settings.py,
tests/deploy/test_manifests.py).

Precedence: a flag beats its environment variable, which beats the default.
A bad value in either names the flag or the variable and what it expects.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off", ""})


def parse_bool(value: str) -> bool:
    """The one way the project reads a boolean from text (environment variables)."""
    v = value.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise ValueError(f"expected one of {sorted(TRUE)} or {sorted(FALSE - {''})}, got {value!r}")


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """A boolean environment variable; unset is false. Bad text raises ValueError naming it."""
    raw = (os.environ if environ is None else environ).get(name, "")
    try:
        return parse_bool(raw)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def validated(check: Callable[[str], bool], rule: str) -> Callable[[str], str]:
    """A parser that takes text as it is when `check` accepts it, else says `rule`."""
    def parse(value: str) -> str:
        if not check(value):
            raise ValueError(f"{value!r} must be {rule}")
        return value
    return parse


@dataclass(frozen=True, slots=True)
class Option:
    """How one dataclass field is set from the command line and the environment.

    - `help`: one sentence for `--help`, the env files and docs.
    - `flag`/`env`: override the derived names (`--field-name`, `PREFIX_FIELD_NAME`).
    - `parse`: text -> value, for types that are not int/float/str/bool.
    - `show`: text -> the default as written in env files and docs.
    - `choices`: allowed values (checked for flag and environment alike).
    - `repeat`: a list: the flag repeats, the variable is `separator`-separated
      (a comma unless the values hold commas themselves).
    - `group`: heading under which env files and docs list it.
    """

    help: str
    flag: str | None = None
    env: str | None = None
    parse: Callable[[str], Any] | None = None
    show: Callable[[Any], str] | None = None
    choices: Sequence[str] | None = None
    repeat: bool = False
    separator: str = ","
    metavar: str | None = None
    group: str = ""
    secret: bool = False


def option(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
           **kwargs: Any) -> Any:
    """A dataclass field that is also a command-line option (see `Option`)."""
    meta = {"option": Option(help=help, **kwargs)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class Declared:
    """One option as resolved for a prefix: where it lives and how it is spelled."""

    path: tuple[str, ...]  # field names from the root dataclass down
    option: Option
    kind: Any  # the field's type with None stripped
    optional: bool
    default: Any
    flag: str
    env: str

    @property
    def dest(self) -> str:
        return "__".join(self.path)

    def default_text(self) -> str:
        if self.option.show is not None:
            return self.option.show(self.default)
        if self.default is None:
            return ""
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, dict):
            return ",".join(f"{k}={v}" for k, v in self.default.items())
        if isinstance(self.default, list | tuple):
            return ",".join(str(x) for x in self.default)
        return str(self.default)

    def convert(self, text: str) -> Any:
        if self.option.repeat:
            return [self._one(x.strip()) for x in text.split(self.option.separator) if x.strip()]
        return self._one(text)

    def _one(self, text: str) -> Any:
        if self.option.parse is not None:
            value = self.option.parse(text)
        elif self.kind is bool:
            value = parse_bool(text)
        elif self.kind in (int, float):
            value = self.kind(text)
        else:
            value = text
        if self.option.choices is not None and value not in self.option.choices:
            raise ValueError(f"expected one of {', '.join(self.option.choices)}, got {text!r}")
        return value


def _unwrap(tp: Any) -> tuple[Any, bool]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        return (members[0] if len(members) == 1 else str), True
    origin = typing.get_origin(tp)
    if origin is dict:
        return tuple, False
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return (args[0] if args else str), False
    return tp, False


def declared(cls: type, prefix: str) -> list[Declared]:
    """Every option of `cls`, nested dataclasses flattened, in declaration order."""
    return list(_walk(cls, prefix, ()))


def _walk(cls: type, prefix: str, path: tuple[str, ...]) -> Iterator[Declared]:
    hints = typing.get_type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        opt = f.metadata.get("option")
        tp = hints[f.name]
        if opt is None:
            if dataclasses.is_dataclass(tp) and isinstance(tp, type):
                yield from _walk(tp, prefix, (*path, f.name))
            continue
        kind, optional = _unwrap(tp)
        name = f.name.replace("_", "-")
        yield Declared((*path, f.name), opt, kind, optional, getattr(instance, f.name),
                       opt.flag or f"--{name}", opt.env or f"{prefix}_{f.name.upper()}")


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str) -> list[Declared]:
    """Add a flag for every declared option of `cls`. Values are resolved by
    `from_args`, so that the environment is read and checked at parse time."""
    decl = declared(cls, prefix)
    for d in decl:
        default = d.default_text()
        tail = f" ({d.env}" + (f", default: {default})" if default and not d.option.secret else ")")
        common: dict[str, Any] = {"dest": d.dest, "default": None, "help": d.option.help + tail}
        if d.kind is bool and not d.option.repeat:
            parser.add_argument(d.flag, action=argparse.BooleanOptionalAction, **common)
        else:
            parser.add_argument(d.flag, action="append" if d.option.repeat else "store",
                                metavar=d.option.metavar or ("|".join(d.option.choices) if d.option.choices else _METAVARS.get(d.kind, "TEXT")),
                                **common)
    return decl


_METAVARS = {int: "N", float: "NUM", str: "TEXT"}


class SettingError(ValueError):
    """A flag or environment variable has a value its option cannot take."""


def resolve(cls: type[T], prefix: str, ns: argparse.Namespace | None = None,
            environ: Mapping[str, str] | None = None) -> T:
    """Build `cls` from parsed flags, then the environment, then defaults."""
    env = os.environ if environ is None else environ
    values: dict[tuple[str, ...], Any] = {}
    for d in declared(cls, prefix):
        given = getattr(ns, d.dest, None) if ns is not None else None
        try:
            if isinstance(given, bool):
                values[d.path] = given
            elif given is not None:
                if d.option.repeat:
                    values[d.path] = [v for text in given for v in d.convert(text)]
                else:
                    values[d.path] = d.convert(given)
            elif d.env in env:
                values[d.path] = d.convert(env[d.env])
        except (ValueError, argparse.ArgumentTypeError) as exc:
            where = d.flag if given is not None else d.env
            raise SettingError(f"{where}: {exc}") from None
    return _build(cls, (), values)


def _build(cls: type[T], path: tuple[str, ...], values: dict[tuple[str, ...], Any]) -> T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # every config class is a dataclass
        here = (*path, f.name)
        if here in values:
            value = values[here]
            if typing.get_origin(hints[f.name]) is dict and isinstance(value, list):
                value = dict(value)  # a repeated KEY=VALUE option
            kwargs[f.name] = value
        elif f.metadata.get("option") is None and dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], here, values)
    return cls(**kwargs)


def env_file(cls: type, prefix: str, header: str = "") -> str:
    """The systemd EnvironmentFile of a config class: every variable, commented
    out at its default, grouped, each with its help."""
    out = [header.rstrip() + "\n"] if header else []
    group = None
    for d in declared(cls, prefix):
        if d.option.group != group:
            group = d.option.group
            out.append(f"\n# --- {group} ---\n" if group else "\n")
        out.append(f"# {d.option.help}\n#{d.env}={'' if d.option.secret else d.default_text()}\n")
    return "".join(out)


def markdown_table(cls: type, prefix: str) -> str:
    """A reference table of every option: flag, variable, default, meaning."""
    rows = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for d in declared(cls, prefix):
        default = "" if d.option.secret else d.default_text()
        rows.append(f"| `{d.flag}` | `{d.env}` | {f'`{default}`' if default else ''} | {d.option.help} |")
    return "\n".join(rows) + "\n"
