"""The validation layer: option kinds, the declarations behind every flag, docs/options.md, the
output preflight and the reader boundary's helpers."""

from __future__ import annotations

import argparse
import math

import pytest

from vsink.cli import build_parser
from vsink.option_docs import DOC, command_parsers, declared, render
from vsink.options import (AnyOf, Float, Int, Invalid, ListOf, Mapping_, Option, OptionError, Template, Text,
                           Threshold, nesting_depth)
from vsink.outputs import OutputError, clean_stale_temps, derived_names, output_dir_problem, output_file_problem


def test_docs_option_tables_are_current():
    """docs/options.md is generated from the declarations: rerun `python -m vsink.option_docs`."""
    assert DOC.read_text(encoding="utf-8") == render()


def test_every_flag_of_every_command_is_declared():
    builtin = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
    commands = dict(command_parsers(build_parser()))
    assert {"vsink scan", "vsink maps", "vsink registers find", "vsink eval pope", "vsink finetune"} <= set(commands)
    for name, parser in commands.items():
        undeclared = [a.dest for a in parser._actions if not isinstance(a, builtin) and not hasattr(a, "option")]
        assert not undeclared, f"{name}: {undeclared}"
        for option in declared(parser):  # the help text is the declaration's
            assert option.help_text() == next(a.help for a in parser._actions if getattr(a, "option", None) is option)


@pytest.mark.parametrize("kind, value", [
    (Float(), float("nan")), (Float(), float("inf")), (Float(), True), (Float(), "1e999"), (Float(), 10 ** 400),
    (Float(0, 1), 1.5), (Float(0, min_open=True), 0), (Float(0, 1, max_open=True), 1.0),
    (Int(1), True), (Int(1), 2.5), (Int(1), 2.0), (Int(0, 10), 11), (Int(), "3"),
    (Text(r"\d+", "digits"), "12a"), (ListOf(Int(), length=2), [1]), (ListOf(Int(), nonempty=True), []),
    (ListOf(Int(), distinct=True), [1, 1]), (Template(("question",)), "Q: {0}"), (Template(("question",)), "{"),
    (Threshold(), "sigma:-1"), (Threshold(), 0), (Threshold(), "nan"), (Mapping_(), {1: 2}),
])
def test_kinds_refuse(kind, value):
    with pytest.raises(Invalid):
        kind.parse(value)


def test_kinds_accept_and_normalise():
    assert Float(0, 1).parse(1) == 1.0 and isinstance(Float().parse(3), float)
    assert Float().parse("1e-3") == 1e-3  # YAML 1.1 reads 1e-3 as a string
    assert Int(0).from_text(" 7 ") == 7 and ListOf(Float()).from_text("0, 0.5,") == [0.0, 0.5]
    assert Threshold().detect_kwargs("sigma:3") == {"method": "sigma", "k": 3.0}
    assert Template(("question",)).parse("{question} {{literal}}") == "{question} {{literal}}"
    assert AnyOf((Int(), Text())).parse("q7") == "q7" and AnyOf((Int(), Text())).parse(7) == 7


def test_option_errors_name_the_key_the_value_and_what_is_allowed():
    option = Option("train.lr", Float(0, min_open=True), 1e-3, "learning rate")
    with pytest.raises(OptionError, match=r"^recipe\.yaml: 'train\.lr' must be a finite number > 0, got nan$"):
        option.check(math.nan, where="recipe.yaml")
    long = "x" * 1000
    with pytest.raises(OptionError) as e:
        option.check(long)
    assert len(str(e.value)) < 400  # a huge value is cut in the message
    assert Option("x", Int(), nullable=True).check(None) is None


def test_nesting_depth_without_recursion():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert nesting_depth(deep) > 32 and nesting_depth({"a": [1, {"b": 2}]}) == 3
    with pytest.raises(Invalid, match="nested deeper"):
        Mapping_().parse({"a": deep})


def test_output_problems(tmp_path):
    (tmp_path / "file").write_text("x")
    assert output_dir_problem(tmp_path / "new" / "deeper") is None  # can be created
    assert output_dir_problem(tmp_path / "file") == "it exists and is not a directory"
    assert "is not a directory" in output_dir_problem(tmp_path / "file" / "sub")
    assert output_file_problem(tmp_path) == "it is a directory; give a file path"
    assert output_file_problem(tmp_path / "new" / "spec.json") is None


def test_derived_names_stay_inside_and_never_collide(tmp_path):
    names = derived_names(["..", ".", "", "x", "X", "x.npz", "maps.json", ".hidden", "a/b"], tmp_path,
                          entries=("{}", "{}.npz"), reserved=("maps.json",))
    assert names == ["image", "image-2", "image-3", "x", "X-2", "x.npz-2", "maps.json-2", "hidden", "a_b"]
    with pytest.raises(OutputError):
        derived_names(["x"], tmp_path, entries=("../{}",))


def test_clean_stale_temps_removes_only_vsink_patterns(tmp_path):
    for name in (".scan.json.ab12cd_9.tmp", ".step_0000010.abcdefgh", "keep.tmp", ".scan.json.short.tmp", "scan.json"):
        (tmp_path / name).mkdir() if name.startswith(".step") else (tmp_path / name).write_text("x")
    removed = clean_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [".scan.json.ab12cd_9.tmp", ".step_0000010.abcdefgh"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".scan.json.short.tmp", "keep.tmp", "scan.json"]
    (tmp_path / ".other.abcdefgh.tmp").write_text("x")
    assert clean_stale_temps(tmp_path, targets=["scan.json"]) == []  # only the named targets' temps


def test_reader_boundary(tmp_path):
    from vsink.readers import ReadError, checked_field, parse_json, read_json, read_text, records

    with pytest.raises(ReadError, match=r"^x\.json: not valid JSON \(NaN is not a JSON number\)$"):
        parse_json('{"score": NaN}', "x.json")  # Python's parser would accept it
    (tmp_path / "a.txt").write_bytes(b"fine\nfine\ncaf\xe9\n")
    with pytest.raises(ReadError, match=r"a\.txt:3: not UTF-8 text"):
        read_text(tmp_path / "a.txt")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ReadError, match=r"list\.json: a spec must be a JSON object, got an array"):
        read_json(tmp_path / "list.json", "spec")
    with pytest.raises(ReadError, match=r"^f: field 'items' must be a list, got the string 'x'$"):
        list(records({"items": "x"}, "items", "f"))
    with pytest.raises(ReadError, match=r"^f: items\[1\]: missing field 'id'$"):
        [checked_field(item, "id", Int(), at) for at, item in records({"items": [{"id": 1}, {}]}, "items", "f")]
