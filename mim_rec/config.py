"""Typed configuration: dataclasses filled from a YAML/JSON file plus ``key=value`` overrides.

Every stage describes its settings as a (nested) dataclass with defaults a user would run.
:func:`load_config` builds it from an optional file and dotted overrides such as
``model.ubm=din optim.lr=0.005``; unknown keys and badly typed values are errors that name
the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Type, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key is unknown or its value has the wrong type."""


@dataclasses.dataclass(frozen=True)
class _Typed:
    """A value read as YAML together with the text it was read from: a text setting takes the
    text itself (YAML turns ``2024_01`` into 202401, ``no`` into False and ``0x1F`` into 31)."""

    value: Any
    text: str


def _typed(text: str, piece: bool = False) -> _Typed:
    """``text`` read as YAML. A ``piece`` of a comma-separated list is a scalar: where YAML
    reads it as something else ("a: b", "[b") or fails on it ("*b"), the piece is its text."""
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except ValueError:  # YAML reads 2026-13-01 as a date and fails building it: keep the text
        return _Typed(text, text)  # for the field's own check to name
    except yaml.YAMLError:
        if not piece:
            raise
        return _Typed(text, text)
    return _Typed(text if piece and isinstance(value, (list, dict)) else value, text)


def _plain(value: Any, wants_text: bool = False) -> Any:
    """``value`` without its :class:`_Typed` wrapper: the typed text where the field wants text
    and YAML made something else of a scalar (its quotes, if any, are YAML's to remove)."""
    if not isinstance(value, _Typed):
        return value
    if wants_text and not isinstance(value.value, (str, list, dict, type(None))):
        return value.text
    return value.value


def _plain_deep(value: Any) -> Any:
    """``value`` with every :class:`_Typed` inside it unwrapped (an untyped field's dicts)."""
    value = _plain(value)
    if isinstance(value, dict):
        return {k: _plain_deep(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_deep(v) for v in value]
    return value


def load_config(cls: Type[T], path: Optional[Union[str, Path]] = None,
                overrides: Iterable[str] = (), preset: Optional[T] = None) -> T:
    """Build ``cls`` from its defaults (or a ``preset`` instance), then ``path`` (YAML or
    JSON), then ``overrides``."""
    data: Dict[str, Any] = dataclasses.asdict(preset) if preset is not None else {}
    if path is not None:
        if Path(path).is_dir():  # a run folder given for its config.json read as "no such file"
            raise ConfigError(f"--config {path}: a folder, not a config file")
        if not Path(path).exists():  # a pipe (--config <(...)) or /dev/null is read like a file
            raise ConfigError(f"--config {path}: no such file")
        try:
            text = Path(path).read_text(encoding="utf-8")
            loaded = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        except OSError as err:
            raise ConfigError(f"--config {path}: cannot be read ({err.strerror or err})") from err
        # ValueError: a date like 2026-13-01, or text that is not UTF-8 (UnicodeDecodeError)
        except (json.JSONDecodeError, yaml.YAMLError, ValueError) as err:
            raise ConfigError(f"{path}: not valid {'JSON' if str(path).endswith('.json') else 'YAML'}: {err}") from err
        if loaded is None and _only_comments(text):  # an empty YAML file sets nothing, as an empty mapping
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping, got {type(loaded).__name__}")
        _merge(data, loaded)
    for item in overrides:
        key, raw = split_override(item)
        try:
            typed = _typed(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({err.__class__.__name__})") from err
        # only a scalar's text matters; a mapping stays one, so a later override can set a key in it
        _set_dotted(data, key.strip(), typed.value if isinstance(typed.value, (dict, list)) else typed)
    return from_dict(cls, data)


def from_dict(cls: Type[T], data: Dict[str, Any], prefix: str = "") -> T:
    """Recursively build a dataclass, checking keys and (simple) types."""
    data = _plain(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(f'{prefix}{k}' for k in unknown)}; "
                          f"valid keys under '{prefix or '.'}': {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    return cls(**kwargs)


def to_dict(config: Any) -> Dict[str, Any]:
    return dataclasses.asdict(config)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:  # each member reads the value as it would alone (text, list or number)
        if _plain(value) is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    # a list takes the typed text too: names=2024_01 is one name, which YAML makes 202401
    value = _plain(value, wants_text=tp is str or origin in (list, tuple))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):  # the comma form, "din,sim" or "0,1,2": each piece read as YAML
            value = [_typed(v.strip(), piece=True) for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)):  # a lone value: seeds=0
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        inner = args[1] if len(args) == 2 else Any
        return {k: _coerce(inner, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any or tp is object:
        return _plain_deep(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads exponents without a dot ("1e-4") as strings
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        # A number may stand for text (a name like 2024); null or a list may not: out=null
        # used to become a folder named "None".
        if value is None or isinstance(value, (list, dict)):
            raise ConfigError(f"{key}: expected text, got {'null' if value is None else repr(value)}")
        return value if isinstance(value, str) else str(value)
    return _plain_deep(value)  # a type this reader does not check (a bare dict, a class)


def _only_comments(text: str) -> bool:
    """Whether ``text`` holds nothing but blank lines and YAML comments (a config file whose
    settings are all commented out, or /dev/null)."""
    return all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines())


def split_override(item: str) -> Tuple[str, str]:
    """``(key, raw value)`` of a ``key=value`` override, refusing one without ``=``. The TorchX
    components apply it at launch, so the job is not scheduled to fail on it."""
    key, sep, raw = item.partition("=")
    if not sep:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    return key, raw


def require_positive(config: Any, keys: Iterable[str], prefix: str = "") -> None:
    """Refuse a zero or negative value at any of the dotted ``keys`` of ``config`` (``None``
    means "not set" and passes), naming the key (after ``prefix``, for an item of a list): a
    batch size or step interval of 0 would otherwise surface as a division by zero, or as a
    run that trains nothing, far from its cause. A list setting has each item checked."""
    for name, value in _named_values(config, keys, prefix):
        if value is not None and not value > 0:  # written so that NaN is refused too
            raise ConfigError(f"{name}={value}: must be positive")
        _require_finite(value, name)


def require_not_negative(config: Any, keys: Iterable[str], prefix: str = "") -> None:
    """Like :func:`require_positive`, for settings where 0 means "off" (a phase's steps, a
    weight, a seed)."""
    for name, value in _named_values(config, keys, prefix):
        if value is not None and not value >= 0:
            raise ConfigError(f"{name}={value}: must not be negative")
        _require_finite(value, name)


def _named_values(config: Any, keys: Iterable[str], prefix: str) -> Iterable[Tuple[str, Any]]:
    """``(name, value)`` of each dotted key's setting, or of each item of a list setting, named
    as :func:`load_config` names it (``seeds[1]``): a bench's list of seeds is checked as
    ``mim train`` checks its one seed."""
    for key in keys:
        value = _dotted(config, key)
        if isinstance(value, (list, tuple)):
            yield from ((f"{prefix}{key}[{i}]", item) for i, item in enumerate(value))
        else:
            yield prefix + key, value


def require_distinct(config: Any, keys: Iterable[str]) -> None:
    """Refuse a list setting at any of ``keys`` that names a value twice: a bench's rows are
    keyed by it, so a repeat would be run and printed twice and read as two results (or a
    spread over seeds that is none)."""
    for key in keys:
        values = _dotted(config, key)
        if len(set(values)) != len(values):
            raise ConfigError(f"{key}={values}: each may appear once")


def _require_finite(value: Any, key: str) -> None:
    """An infinite size, rate or timeout passes a sign check and then overflows far away (a
    thread's timeout, a step count's range)."""
    if value is not None and value == math.inf:
        raise ConfigError(f"{key}={value}: must be finite")


def refuse_settings_set_elsewhere(flag: str, overrides: Iterable[str], set_by: Dict[str, str], command: str) -> None:
    """Refuse an override (given with ``flag``) of a setting ``command`` sets itself;
    ``set_by`` maps each such setting to what sets it. Appended after the command's own
    values, such an override used to win and mislabel the run (``--train model.ubm=sim`` in
    folders named for DIN), or to lose without a word. A key naming a whole section
    (``model=...``) covers the settings in it."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        for setting, source in set_by.items():
            if setting == key or setting.startswith(key + "."):
                raise ConfigError(f"{flag} {item}: {command} sets {setting}; it is set by {source}")


def refuse_changed_settings(config: Any, set_by: Dict[str, str], command: str, prefix: str = "") -> None:
    """Refuse a setting of ``config`` changed from its default that ``command`` sets itself for
    every run (``set_by`` maps each such setting to what sets it): the command's value replaced
    it without a word (``mim bench train model.ubm=sim`` timed avg and din). Read from the
    config, so a config file's setting is refused as an override's is."""
    changed = changed_from_default(config, set_by)
    if changed:
        key = changed[0]
        raise ConfigError(f"{prefix}{key}={_dotted(config, key)}: {command} sets it; it is set by {set_by[key]}")


def changed_from_default(config: Any, keys: Iterable[str]) -> List[str]:
    """The dotted ``keys`` whose setting in ``config`` differs from its class's default, in
    order: a setting equal to its default cannot be told from one left unset."""
    defaults = type(config)()
    return [key for key in keys if _dotted(config, key) != _dotted(defaults, key)]


def require_run_folder(out: str, example: str) -> None:
    """``out`` must name a run folder: an empty ``out=`` wrote the run into the current
    directory, and a file failed deep in training. ``example``: a folder to suggest."""
    if not out.strip():
        raise ConfigError(f"out: empty; give the run folder, e.g. out={example}")
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"out={out}: a file, not a run folder")


def require_existing(config: Any, keys: Iterable[str]) -> None:
    """Refuse a setting naming a file or folder that does not exist, by its dotted key: found
    later, deep in a stage, the error named only the path (for a setting left at its default,
    ``data/world``, one the user never typed) and came after the models had loaded."""
    for key in keys:
        value = _dotted(config, key)
        if value and not Path(value).exists():
            raise ConfigError(f"{key}={value}: no such file or folder")


def require_fraction(config: Any, keys: Iterable[str]) -> None:
    """Refuse a share or probability outside ``0 < value < 1`` (``None`` passes)."""
    for key in keys:
        value = _dotted(config, key)
        if value is not None and not 0 < value < 1:
            raise ConfigError(f"{key}={value}: must lie strictly between 0 and 1")


def _dotted(config: Any, key: str) -> Any:
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _merge(into: Dict[str, Any], update: Dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _set_dotted(data: Dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
    node[parts[-1]] = value
