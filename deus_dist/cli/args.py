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
import textwrap
import typing
from typing import Any, Literal, TypeVar

from deus_dist.config_values import convert_value, load_yaml, unwrap_optional
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
        tp, _ = unwrap_optional(hints[f.name])
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
            kwargs[key] = convert_value(value, hints[key], where)
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
