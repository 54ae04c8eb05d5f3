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
