"""Settings declared once: flag beats environment beats default, bad values
name their flag or variable, nested policies are flattened, and the reference
in docs/settings.md is what the declarations say."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from deploy import settings_reference
from runtime.settings import (
    SettingError,
    add_arguments,
    declared,
    env_file,
    option,
    parse_bool,
    resolve,
)


@dataclass(frozen=True)
class Inner:
    interval: float = option(2.0, help="seconds between checks")


@dataclass
class Sample:
    port: int = option(8000, help="port")
    name: str = option("x", choices=("x", "y"), help="which")
    verbose: bool = option(False, help="talk more")
    edges: list[str] = option(default_factory=list, flag="--edge", repeat=True, help="edges")
    tags: dict[str, str] = option(default_factory=dict, flag="--tag", repeat=True,
                                  parse=lambda v: tuple(v.split("=", 1)), help="tags")
    inner: Inner = field(default_factory=Inner)
    hidden: int = 7  # not an option: keeps its default


def parse(argv: list[str], environ: dict[str, str]) -> Sample:
    p = argparse.ArgumentParser()
    add_arguments(p, Sample, "T")
    return resolve(Sample, "T", p.parse_args(argv), environ)


def test_defaults_when_nothing_is_given() -> None:
    assert parse([], {}) == Sample()


def test_flag_beats_environment_beats_default() -> None:
    assert parse([], {"T_PORT": "9"}).port == 9
    assert parse(["--port", "10"], {"T_PORT": "9"}).port == 10


def test_nested_policy_is_flattened_and_rebuilt() -> None:
    s = parse(["--interval", "0.5"], {})
    assert s.inner == Inner(0.5)
    assert [d.env for d in declared(Sample, "T")][-1] == "T_INTERVAL"


def test_booleans_lists_and_maps() -> None:
    s = parse(["--verbose", "--edge", "a", "--edge", "b,c", "--tag", "k=v"], {})
    assert (s.verbose, s.edges, s.tags) == (True, ["a", "b", "c"], {"k": "v"})
    s = parse([], {"T_VERBOSE": "yes", "T_EDGES": "a,b", "T_TAGS": "k=v,l=w"})
    assert (s.verbose, s.edges, s.tags) == (True, ["a", "b"], {"k": "v", "l": "w"})
    assert parse(["--no-verbose"], {"T_VERBOSE": "1"}).verbose is False


@pytest.mark.parametrize(("argv", "environ", "named"), [
    (["--port", "eight"], {}, "--port"),
    ([], {"T_PORT": "eight"}, "T_PORT"),
    ([], {"T_NAME": "z"}, "T_NAME"),
    ([], {"T_VERBOSE": "maybe"}, "T_VERBOSE"),
])
def test_a_bad_value_names_its_flag_or_variable(argv: list[str], environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingError, match=f"^{named}: "):
        parse(argv, environ)


def test_parse_bool_is_the_one_reading_of_booleans() -> None:
    assert [parse_bool(v) for v in ("1", "TRUE", "yes", "on", "0", "false", "No", "off", "")] == [True] * 4 + [False] * 5
    with pytest.raises(ValueError):
        parse_bool("2")


def test_env_file_lists_every_variable_at_its_default() -> None:
    text = env_file(Sample, "T")
    for line in ("#T_PORT=8000", "#T_NAME=x", "#T_VERBOSE=false", "#T_EDGES=", "#T_INTERVAL=2.0"):
        assert line in text.splitlines()


def test_docs_settings_reference_matches_the_declarations() -> None:
    assert settings_reference.DOC.read_text() == settings_reference.render(), (
        "docs/settings.md is stale: run `python -m deploy.settings_reference`")
