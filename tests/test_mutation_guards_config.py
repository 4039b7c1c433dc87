"""Config validation, error by error: every message names the key, where it came from and what
was expected, exactly (scripts/mutation.py, area config)."""
from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from typing import Any, Literal, Optional

import pytest

from forgelab import config as cfg
from forgelab.config import ConfigError, field


@dataclass
class Sub:
    depth: int = field(1, help="depth")


@dataclass
class Inner:
    lr: float = field(1e-3, help="learning rate")
    kind: Literal["adamw", "sgd"] = field("adamw", help="optimizer")
    sub: Sub = field(Sub, help="a section in a section")

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("key 'lr': must be > 0")


@dataclass
class Item:
    name: str = field(help="required")
    weight: float = field(1.0)


@dataclass
class Conf:
    steps: int = field(10, help="steps")
    name: str = field("x", help="run name")
    flag: bool = field(False, help="a switch")
    ratio: float = field(0.5, help="a ratio")
    tags: list[str] = field(["a"], help="tags")
    table: dict[str, int] = field({}, help="named counts")
    maybe: Optional[int] = field(None, help="optional")
    mixed: int | dict[str, Any] = field(0, help="a number or a mapping")
    items: list[Item] = field([{"name": "first"}], help="a list of sections")
    inner: Inner = field(Inner, help="a section")
    anything: Any = field(None, help="no type")

    def validate(self) -> None:
        if self.steps < 0:
            raise ConfigError("key 'steps': must be >= 0")


@dataclass(kw_only=True)
class Later:
    first: int = field(1)
    needed: str = field(help="required, after a key with a default")


def write(p, text):
    p.write_text(text, encoding="utf-8")
    return p


def error(fn, *a, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*a, **kw)
    return str(e.value)


def test_field_keeps_its_help_and_gives_each_object_its_own_defaults():
    fields = {f.name: f for f in dataclasses.fields(Conf)}
    assert fields["steps"].metadata == {"help": "steps"}
    assert dataclasses.fields(Item)[1].metadata == {"help": ""}
    assert fields["steps"].default == 10 and fields["maybe"].default is None
    a, b = cfg.build(Conf, {}), cfg.build(Conf, {})
    a.tags.append("b")
    a.table["k"] = 1
    assert b.tags == ["a"] and b.table == {} and a.inner is not b.inner
    assert isinstance(a.inner, Inner) and a.inner.sub.depth == 1
    assert error(cfg.build, Item, {}) == "missing required key 'name'"


def test_list_defaults_of_sections_are_built_like_given_values():
    c = cfg.build(Conf, {})
    assert c.items == [Item(name="first", weight=1.0)] and isinstance(c.items[0], Item)


def test_a_required_key_after_a_given_one_is_still_required():
    assert error(cfg.build, Later, {"first": 2}) == "missing required key 'needed'"
    assert cfg.build(Later, {"needed": "n"}).first == 1


def test_yaml_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert error(cfg.load, Conf, [missing]) == f"config file not found: {missing.resolve()}"
    bad = write(tmp_path / "bad.yaml", "steps: [1,\n")
    assert error(cfg.load, Conf, [bad]).startswith(f"{bad.resolve()}: invalid YAML: ")
    top = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    assert error(cfg.load, Conf, [top]) == f"{top.resolve()}: top level must be a mapping, got list"
    assert cfg.load(Conf, [write(tmp_path / "empty.yaml", "")]) == cfg.build(Conf, {})
    assert cfg.load(Conf, [write(tmp_path / "u.yaml", "name: Grüße, 北京\n")]).name == "Grüße, 北京"


def test_a_yaml_date_is_not_silently_a_string(tmp_path):
    f = write(tmp_path / "d.yaml", "name: 2024-01-01\n")
    assert error(cfg.load, Conf, [f]) == (f"key 'name' (from {f}): expected str, got date "
                                          f"{datetime.date(2024, 1, 1)!r}")


def test_layers_merge_deeply_and_the_last_wins(tmp_path):
    write(tmp_path / "a.yaml", "steps: 1\ntags: [x, y]\ninner:\n  lr: 0.5\n  sub:\n    depth: 3\n")
    write(tmp_path / "b.yaml", "steps: 2\n")
    child = write(tmp_path / "c.yaml", "extends: [a.yaml, b.yaml]\ntags: [z]\ninner:\n  kind: sgd\n")
    c = cfg.load(Conf, child)  # one path, not a list
    assert (c.steps, c.tags, c.inner.lr, c.inner.kind, c.inner.sub.depth) == (2, ["z"], 0.5, "sgd", 3)
    assert cfg.load(Conf) == cfg.build(Conf, {})


def test_a_bad_nested_key_names_the_file_that_set_it(tmp_path):
    write(tmp_path / "base.yaml", "inner:\n  lr: 0.1\n")
    over = write(tmp_path / "over.yaml", "extends: base.yaml\ninner:\n  kind: adam\n")
    msg = error(cfg.load, Conf, [over])
    assert msg == (f"key 'inner.kind' (from {over.resolve()}): 'adam' is not one of ['adamw', 'sgd']; "
                   "did you mean 'adamw'?")
    deep = write(tmp_path / "deep.yaml", "extends: base.yaml\ninner:\n  sub:\n    depth: deep\n")
    assert error(cfg.load, Conf, [deep]) == (f"key 'inner.sub.depth' (from {deep.resolve()}): expected int, "
                                             "got str 'deep'")


def test_circular_extends_is_refused(tmp_path):
    a = write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    assert error(cfg.load, Conf, [a]) == f"{a.resolve()}: circular 'extends'"
    me = write(tmp_path / "me.yaml", "extends: me.yaml\n")
    assert error(cfg.load, Conf, [me]) == f"{me.resolve()}: circular 'extends'"


def test_set_overrides_parse_yaml_values():
    assert cfg.parse_set("a.b=c=d") == (["a", "b"], "c=d")
    assert cfg.parse_set(" x =3") == (["x"], 3)
    assert cfg.parse_set("name=") == (["name"], "")
    assert cfg.parse_set("name=[oops") == (["name"], "[oops")  # not YAML: the text itself
    assert error(cfg.parse_set, "steps") == "--set 'steps': expected KEY=VALUE, e.g. --set train.lr=1e-4"
    c = cfg.load(Conf, [], ["name=", "tags=[p, q]", "inner.sub.depth=4"])
    assert (c.name, c.tags, c.inner.sub.depth) == ("", ["p", "q"], 4)


def test_set_into_a_value_that_is_no_section_is_refused(tmp_path):
    f = write(tmp_path / "c.yaml", "name: x\n")
    assert error(cfg.load, Conf, [f], ["name.a.b=1"]) == "--set name.a.b=1: name.a is not a section"


def test_set_mappings_are_traced_to_set(tmp_path):
    msg = error(cfg.load, Conf, [], ["inner={sub: {depth: x}}"])
    assert msg == "key 'inner.sub.depth' (from --set): expected int, got str 'x'"
    assert error(cfg.load, Conf, [], ["inner.kind=adam"]).startswith("key 'inner.kind' (from --set): ")


def test_errors_without_a_source_name_only_the_key():
    assert error(cfg.build, Conf, {"steps": "many"}) == "key 'steps': expected int, got str 'many'"
    assert error(cfg.build, Conf, {"maybe": "x"}) == "key 'maybe': expected Optional, got 'x'"
    assert error(cfg.build, Conf, {"mixed": "x"}) == "key 'mixed': expected int | dict[str, Any], got 'x'"
    assert error(cfg.build, Conf, {"inner": 3}) == "key 'inner': expected a mapping, got 3"
    assert error(cfg.build, Conf, {"tags": "a"}) == "key 'tags': expected a list, got 'a'"
    assert error(cfg.build, Conf, {"table": [1]}) == "key 'table': expected a mapping, got [1]"
    assert error(cfg.build, Conf, {"tags": ["a", None]}) == "key 'tags[1]': expected str, got NoneType None"


def test_wrong_types_are_traced_to_their_file(tmp_path):
    f = write(tmp_path / "t.yaml", "inner: 3\ntags: a\n")
    assert error(cfg.load, Conf, [f]).startswith(f"key 'inner' (from {f}): expected a mapping, got 3")
    f = write(tmp_path / "l.yaml", "tags: a\n")
    assert error(cfg.load, Conf, [f]) == f"key 'tags' (from {f}): expected a list, got 'a'"
    f = write(tmp_path / "m.yaml", "table: [1]\n")
    assert error(cfg.load, Conf, [f]) == f"key 'table' (from {f}): expected a mapping, got [1]"
    f = write(tmp_path / "i.yaml", "items:\n  - {name: a}\n  - {name: b, weight: heavy}\n")
    msg = error(cfg.load, Conf, [f])  # (the file of a list item's key is not named: origins key "items" only)
    assert msg.startswith("key 'items[1].weight'") and msg.endswith(": expected float, got str 'heavy'")
    f = write(tmp_path / "d.yaml", "table: {a: 1, b: x}\n")
    assert error(cfg.load, Conf, [f]) == f"key 'table.b' (from {f}): expected int, got str 'x'"
    f = write(tmp_path / "o.yaml", "maybe: x\n")
    assert error(cfg.load, Conf, [f]) == f"key 'maybe' (from {f}): expected Optional, got 'x'"


def test_values_are_coerced_only_where_nothing_is_lost():
    c = cfg.build(Conf, {"steps": 3.0, "ratio": "1e-4", "name": 7, "maybe": None, "table": {1: 2},
                         "tags": [], "mixed": {"a": [1]}, "anything": {"x": object}, "flag": True})
    assert (c.steps, c.ratio, c.name, c.maybe, c.table, c.mixed, c.flag) == \
        (3, 1e-4, "7", None, {"1": 2}, {"a": [1]}, True)
    assert type(c.steps) is int and type(c.ratio) is float and c.anything == {"x": object}
    assert cfg.build(Conf, {"ratio": 2}).ratio == 2.0 and type(cfg.build(Conf, {"ratio": 2}).ratio) is float
    assert cfg.build(Conf, {"maybe": 4}).maybe == 4
    for key, value, msg in (("steps", 2.5, "expected int, got float 2.5"),
                            ("steps", True, "expected int, got bool True"),
                            ("ratio", True, "expected float, got bool True"),
                            ("ratio", "fast", "expected float, got str 'fast'"),
                            ("name", True, "expected str, got bool True"),
                            ("name", None, "expected str, got NoneType None"),
                            ("flag", 1, "expected bool, got int 1"),
                            ("flag", "yes", "expected bool, got str 'yes'")):
        assert error(cfg.build, Conf, {key: value}) == f"key '{key}': {msg}"


def test_unsupported_schema_types_are_named():
    @dataclass
    class Odd:
        s: set = field(None)
    assert error(cfg.build, Odd, {"s": [1]}) == "key 's': unsupported schema type <class 'set'>"


def test_yaml_booleans_become_the_word_choice_they_spell():
    @dataclass
    class Words:
        a: Literal["yes", "maybe"] = field("maybe")
        b: Literal["true", "maybe"] = field("maybe")
        c: Literal["no", "maybe"] = field("maybe")
        d: Literal["false", "maybe"] = field("maybe")
        e: Literal["on", "off"] = field("on")
        f: Literal[True, "auto"] = field("auto")
    w = cfg.load(Words, [], ["a=yes", "b=true", "c=no", "d=false", "e=off", "f=true"])
    assert (w.a, w.b, w.c, w.d, w.e, w.f) == ("yes", "true", "no", "false", "off", True)
    assert error(cfg.build, Words, {"a": False}) == "key 'a': False is not one of ['yes', 'maybe']"
    assert error(cfg.build, Words, {"c": True}) == "key 'c': True is not one of ['no', 'maybe']"


def test_a_wrong_choice_suggests_the_closest_or_nothing():
    assert error(cfg.build, Inner, {"kind": "sg"}) == "key 'kind': 'sg' is not one of ['adamw', 'sgd']; did you mean 'sgd'?"
    assert error(cfg.build, Inner, {"kind": "zzz"}) == "key 'kind': 'zzz' is not one of ['adamw', 'sgd']"


def test_unknown_keys_suggest_a_near_key_or_list_the_valid_ones():
    assert error(cfg.build, Conf, {"stexxxx": 1}) == "unknown key 'stexxxx'; did you mean 'steps'?"
    assert error(cfg.build, Inner, {"zz": 1}) == "unknown key 'zz'; valid keys here: kind, lr, sub"
    assert error(cfg.build, Conf, {"inner": {"knd": "sgd"}}) == "unknown key 'inner.knd'; did you mean 'inner.kind'?"


def test_validate_runs_and_names_the_section_it_failed_in():
    assert error(cfg.build, Conf, {"steps": -1}) == "key 'steps': must be >= 0"
    assert error(cfg.build, Conf, {"inner": {"lr": 0}}) == "key 'lr': must be > 0 in inner"
    assert error(cfg.build, Conf, {"inner": {"sub": {"depth": "x"}}}) == \
        "key 'inner.sub.depth': expected int, got str 'x'"


def test_field_builds_the_dataclass_field_it_describes():
    # field() runs when a schema class is defined: define one here, so that it runs in the test
    @dataclass
    class Made:
        req: int = field(help="required")
        plain: int = field(3, help="three")
        quiet: str = field("q")
        items: list = field([{"a": [1]}], help="copied per object")
        section: Sub = field(Sub, help="a section")
        kind: Any = field(dict, help="a class that is no dataclass is a plain default")
    fs = {f.name: f for f in dataclasses.fields(Made)}
    assert fs["kind"].default is dict and Made(req=0).kind is dict
    assert fs["plain"].metadata == {"help": "three"} and fs["quiet"].metadata == {"help": ""}
    assert fs["req"].default is dataclasses.MISSING and fs["req"].default_factory is dataclasses.MISSING
    assert fs["plain"].default == 3 and fs["plain"].default_factory is dataclasses.MISSING
    assert fs["section"].default_factory is Sub and fs["section"].default is dataclasses.MISSING
    a, b = Made(req=1), Made(req=2)
    assert a.items == [{"a": [1]}] and a.items is not b.items and a.items[0]["a"] is not b.items[0]["a"]
    assert isinstance(a.section, Sub) and a.section is not b.section and a.plain == 3 and a.quiet == "q"


def test_a_union_tries_each_member_and_builds_sections_inside_it():
    @dataclass
    class U:
        n: "None | int" = field(None)  # NoneType listed first
        opt: Optional[Inner] = field(None)
    assert cfg.build(U, {"n": 3}).n == 3 and cfg.build(U, {"n": None}).n is None
    u = cfg.build(U, {"opt": {"lr": 0.25}})
    assert isinstance(u.opt, Inner) and u.opt.lr == 0.25
    assert error(cfg.build, U, {"opt": {"lr": "x"}}) == "key 'opt': expected Optional, got {'lr': 'x'}"


def test_only_a_yaml_boolean_is_read_as_a_word_choice():
    @dataclass
    class Knob:
        fused: Literal["on", "off"] = field("on")
    assert error(cfg.build, Knob, {"fused": 0}) == "key 'fused': 0 is not one of ['on', 'off']"
    assert error(cfg.build, Knob, {"fused": 1}) == "key 'fused': 1 is not one of ['on', 'off']"
