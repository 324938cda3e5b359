"""One typed config, filled from a YAML file and from flags (flags win), documented by its docstrings.

A config is a dataclass whose fields each carry a docstring right below them (the attribute
docstring convention); ``--help`` shows those docstrings, and a YAML key that is not a field is an
error naming the key. Booleans get ``--flag`` and, when their default is not False, ``--no_flag``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from deus_dist.errors import UserError

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: ``x: int = 1`` followed by ``\"\"\"doc\"\"\"``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for stmt, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML or flag value to the field's type; UserError naming ``key`` if it can't."""
    inner, optional = _unwrap_optional(tp)
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
            return [_convert(v, item, key) for v in value]
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


def _section(cls: type, name: str) -> type:
    """The most basic dataclass in ``cls``'s bases that declares field ``name`` (a config that only
    re-defaults a field keeps it in its section)."""
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and name in klass.__dict__.get("__annotations__", {}):
            return klass
    return cls


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    own_config = "config" in {f.name for f in dataclasses.fields(cls)}  # tools/study.py's study file
    if not own_config:
        parser.add_argument(
            "--config",
            metavar="FILE.yaml",
            help="YAML file with any of the options below as keys (flags given here override it).",
        )
    groups: dict[type, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        section = _section(cls, f.name)
        if section not in groups:  # configs made of shared sections show each as its own group
            doc = (inspect.getdoc(section) or section.__name__).splitlines()[0].rstrip(".")
            title = doc if section is not cls else None
            groups[section] = parser.add_argument_group(title) if title else parser
        add = groups[section].add_argument
        tp, _ = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        doc = docs.get(f.name, "")
        help_text = doc if "Default" in doc else f"{doc} (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %: "99.8%" is text
        if tp is bool:
            add(f"--{f.name}", dest=f.name, action="store_const", const=True, help=help_text)
            if default is not False:
                add(
                    f"--no_{f.name}",
                    dest=f.name,
                    action="store_const",
                    const=False,
                    help=f"Turn --{f.name} off.",
                )
            continue
        kwargs: dict[str, Any] = {"help": help_text, "metavar": f.name.upper()}
        if typing.get_origin(tp) is Literal:
            kwargs["choices"] = typing.get_args(tp)
            kwargs.pop("metavar")
        add(f"--{f.name}", dest=f.name, **kwargs)
    return parser


def load_yaml(path: str) -> dict:
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


def parse_config(cls: type[T], argv: list[str] | None, prog: str, description: str) -> T:
    """Fill ``cls`` from ``--config FILE.yaml`` then from flags; report every bad key at once."""
    parser = build_parser(cls, prog, description)
    ns = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    problems: list[str] = []
    names = {f.name for f in dataclasses.fields(cls)}
    if "config" in ns and "config" not in names:
        for key, value in load_yaml(ns.pop("config")).items():
            key = str(key).replace("-", "_")
            if key not in names:
                problems.append(f"--config: unknown key {key!r}; valid keys: {', '.join(sorted(names))}")
            else:
                values[key] = (value, f"--config key {key!r}")
    for key, value in ns.items():
        values[key] = (value, f"--{key}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, (value, where) in values.items():
        try:
            kwargs[key] = _convert(value, hints[key], where)
        except UserError as e:
            problems.extend(e.problems)
    if problems:
        raise UserError(problems)
    return cls(**kwargs)


def tool_main(prog: str, cls: type[T], description: str, run, argv: list[str] | None) -> int:
    """A tool's ``main``: ``run(cfg)`` on the options parsed from ``argv``; bad input (a UserError)
    becomes one message on stderr and exit status 2."""
    import sys

    try:
        run(parse_config(cls, argv, prog, description))
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
