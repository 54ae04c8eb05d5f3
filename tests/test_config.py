from dataclasses import dataclass, field
from typing import List, Optional

import pytest

from mim_rec.config import ConfigError, load_config


@dataclass
class Optim:
    lr: float = 0.005
    name: str = "adam"


@dataclass
class Cfg:
    seed: int = 0
    layers: List[int] = field(default_factory=lambda: [64, 32])
    optim: Optim = field(default_factory=Optim)
    out: Optional[str] = None
    fast: bool = False


def test_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\noptim:\n  lr: 0.1\n")
    cfg = load_config(Cfg, path, ["optim.name=sgd", "layers=[8,4]", "fast=true", "out=x"])
    assert cfg == Cfg(seed=3, layers=[8, 4], optim=Optim(lr=0.1, name="sgd"), out="x", fast=True)


@pytest.mark.parametrize("text", ["1e-4", "1.0e-4", "0.0001"])
def test_a_float_in_exponent_notation_is_a_number(text):
    # YAML 1.1 reads "1e-4" (no dot) as a string; a learning rate must still parse
    assert load_config(Cfg, None, [f"optim.lr={text}"]).optim.lr == 1e-4


@pytest.mark.parametrize("override, needle", [
    ("optim.lrr=1", "optim.lrr"),
    ("seed=abc", "seed"),
    ("fast=3", "fast"),
    ("optim.lr=fast", "optim.lr"),
    ("novalue", "key=value"),
    ("seed=2026-13-01", "seed: expected an integer, got '2026-13-01'"),  # YAML's date constructor raised
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(Cfg, None, [override])


def test_a_config_file_with_an_impossible_date_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out: 2026-02-30\n")
    with pytest.raises(ConfigError, match="c.yaml: not valid YAML"):
        load_config(Cfg, path, [])
    assert load_config(Cfg, None, ["out=2026-02-30"]).out == "2026-02-30"  # the override keeps the text


@pytest.mark.parametrize("override, needle", [
    ("optim.name=null", "optim.name: expected text, got null"),  # became the text "None" (out=null: a folder "None")
    ("optim.name=[a, b]", "optim.name: expected text, got \\['a', 'b'\\]"),
])
def test_null_or_a_list_is_not_text(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(Cfg, None, [override])
    assert load_config(Cfg, None, ["out=null", "optim.name=2024"]) == Cfg(out=None, optim=Optim(name="2024"))


@pytest.mark.parametrize("text", ["2024_01", "no", "on", "010", "0x1F", "1.10", "1:30", "2026-01-02", "~x"])
def test_text_settings_keep_the_text_typed(text):
    """Read as YAML first, 'out=2024_01' became '202401', 'no' 'False' and '0x1F' '31'."""
    cfg = load_config(Cfg, None, [f"out={text}", f"optim.name={text}"])
    assert (cfg.out, cfg.optim.name) == (text, text)
    assert load_config(Cfg, None, ["optim.name='quoted'"]).optim.name == "quoted"  # YAML's quotes still work


def test_a_config_file_key_that_is_not_text_is_named(tmp_path):
    """YAML reads '1:', 'yes:' and '~:' as an int, a bool and null: a TypeError traceback."""
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\n1: 2\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['1'\]"):
        load_config(Cfg, path, [])


@pytest.mark.parametrize("override, layers", [("layers=3,2,1", [3, 2, 1]), ("layers=5", [5]), ("layers=[7]", [7])])
def test_a_list_of_numbers_takes_the_comma_form_and_a_lone_value(override, layers):
    """Only text lists split on commas ('3' stayed text: 'expected an integer'), and one value
    was 'expected a list'."""
    assert load_config(Cfg, None, [override]).layers == layers


@pytest.mark.parametrize("value, positive, not_negative", [
    (".inf", "must be finite", "must be finite"), ("1e400", "must be finite", "must be finite"),
    ("-.inf", "must be positive", "must not be negative"), (".nan", "must be positive", "must not be negative")])
def test_an_infinite_or_nan_setting_is_refused(value, positive, not_negative):
    """An infinite window or timeout passed and then overflowed a thread's wait: the RIM
    batcher died and every later request waited out its timeout."""
    from mim_rec.config import require_not_negative, require_positive

    cfg = load_config(Cfg, None, [f"optim.lr={value}"])
    with pytest.raises(ConfigError, match=f"optim.lr=.*: {positive}"):
        require_positive(cfg, ["optim.lr"])
    with pytest.raises(ConfigError, match=f"optim.lr=.*: {not_negative}"):
        require_not_negative(cfg, ["optim.lr"])


@dataclass
class Open:
    names: List[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    nested: Optional[List[str]] = None


def test_typed_text_stays_out_of_untyped_settings_and_sections():
    """Review of the typed-text change: a wrapper reached an untyped dict (and config.json),
    a section set whole could no longer take a key, list pieces YAML cannot read were a
    traceback, and one name for a list of names lost its text."""
    cfg = load_config(Open, None, ["options.a.b=1", "options.c=no"])
    assert cfg.options == {"a": {"b": 1}, "c": False}
    assert load_config(Open, None, ["options={a: 1}", "options.b=2"]).options == {"a": 1, "b": 2}
    assert load_config(Open, None, ["names=a,*b,[c"]).names == ["a", "*b", "[c"]
    assert load_config(Open, None, ["names=2024_01", "nested=0x1F"]) == Open(names=["2024_01"], nested=["0x1F"])
    assert load_config(Open, None, ["nested=null"]).nested is None
