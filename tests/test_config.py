"""Config system: composition, overrides, and errors that name key, file and nearest key."""
from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from forgelab import config as cfg
from forgelab.config import ConfigError, field


@dataclass
class Optim:
    lr: float = field(1e-3, help="peak learning rate")
    kind: Literal["adamw", "sgd"] = field("adamw", help="optimizer")


@dataclass
class Conf:
    name: str = field("x", help="run name")
    steps: int = field(10, help="steps")
    tags: list[str] = field([], help="tags")
    extra: Optional[int] = field(None, help="optional")
    optim: Optim = field(Optim, help="optimizer section")


def write(p, text):
    p.write_text(text)
    return p


def test_extends_overlay_and_set(tmp_path):
    base = write(tmp_path / "base.yaml", "steps: 5\noptim:\n  lr: 0.1\n")
    over = write(tmp_path / "over.yaml", "extends: base.yaml\noptim:\n  kind: sgd\n")
    track = write(tmp_path / "track.yaml", "steps: 7\n")
    c = cfg.load(Conf, [over, track], ["optim.lr=1e-4", "tags=[a, b]"])
    assert (c.steps, c.optim.kind, c.optim.lr, c.tags) == (7, "sgd", 1e-4, ["a", "b"])


def test_unknown_key_names_key_file_and_nearest(tmp_path):
    f = write(tmp_path / "c.yaml", "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        cfg.load(Conf, [f])
    msg = str(e.value)
    assert "optim.lrr" in msg and str(f) in msg and "optim.lr" in msg


def test_unknown_key_from_parent_file_names_parent(tmp_path):
    parent = write(tmp_path / "parent.yaml", "stepz: 3\n")
    child = write(tmp_path / "child.yaml", "extends: parent.yaml\nname: y\n")
    with pytest.raises(ConfigError, match="parent.yaml.*did you mean 'steps'"):
        cfg.load(Conf, [child])


def test_wrong_type_fails_naming_source(tmp_path):
    f = write(tmp_path / "c.yaml", "steps: many\n")
    with pytest.raises(ConfigError, match=r"'steps'.*c.yaml.*expected int"):
        cfg.load(Conf, [f])
    with pytest.raises(ConfigError, match=r"'optim.kind'.*--set.*not one of"):
        cfg.load(Conf, [], ["optim.kind=adam"])


def test_describe_lists_every_key_with_meaning():
    rows = {r[0]: r for r in cfg.describe(Conf)}
    assert rows["optim.lr"][2] == "0.001" and rows["optim.lr"][3] == "peak learning rate"
    assert set(rows) >= {"name", "steps", "tags", "extra", "optim", "optim.kind"}


def test_config_hash_is_stable_and_sensitive():
    a, b = cfg.build(Conf, {"steps": 3}), cfg.build(Conf, {"steps": 3})
    assert cfg.config_hash(a) == cfg.config_hash(b)
    assert cfg.config_hash(a) != cfg.config_hash(cfg.build(Conf, {"steps": 4}))


def test_on_off_choices_survive_yaml_booleans(tmp_path):
    """YAML reads `off` as false: a choice key whose choices are words still gets "off"."""
    @dataclass
    class Knob:
        fused: Literal["auto", "on", "off"] = field("auto", help="fused kernel")

    assert cfg.load(Knob, [], ["fused=off"]).fused == "off"
    assert cfg.load(Knob, [write(tmp_path / "k.yaml", "fused: on\n")]).fused == "on"
    with pytest.raises(ConfigError, match="not one of"):
        cfg.load(Optim, [], ["kind=off"])  # no word choice matches: still an error
