"""Option values from YAML files and flags, coerced to a config field's type: shared by the command
lines (``cli/args.py``) and the study's spec (``study/spec.py``), below both."""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from deus_dist.errors import UserError


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def convert_value(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML or flag value to the field's type; UserError naming ``key`` if it can't."""
    inner, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{key}: a value is required")
    origin = typing.get_origin(inner)
    try:
        if origin is Literal:
            choices = typing.get_args(inner)
            if value not in choices:
                raise ValueError(f"choose one of {', '.join(map(str, choices))}")
            return value
        if origin is list:
            (item,) = typing.get_args(inner)
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v != ""]
            if not isinstance(value, (list, tuple)):
                raise ValueError("expected a list")
            return [convert_value(v, item, key) for v in value]
        if inner is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1"):
                return True
            if str(value).lower() in ("false", "no", "0"):
                return False
            raise ValueError("expected true or false")
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            return int(value)
        if inner is float:
            number = float(value)
            if not math.isfinite(number):  # "nan" passes every comparison a later check makes
                raise ValueError("expected a finite number")
            return number
        if inner is str:
            return str(value)
    except (TypeError, ValueError) as e:
        raise UserError(f"{key}: invalid value {value!r} ({e})") from None
    return value


def load_yaml(path: str) -> dict:
    """A YAML file holding a mapping (a --config file); a UserError naming --config otherwise."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config: {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config: {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config: {path} must hold a mapping of option names to values")
    return data
