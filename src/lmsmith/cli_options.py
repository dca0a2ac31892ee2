"""Command-line options generated from a pydantic config, so a command's flags, defaults and help are the
config's own and cannot drift from what the Python API and recipes accept.

Scalar fields (str, int, float, bool, paths, `Literal` choices, and `Optional` of those) and lists of
scalars (a repeatable flag): a command whose config nests models keeps those for a recipe file.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from lmsmith.errors import UserError

_SCALARS = (str, int, float, Path)


def _plain(annotation) -> tuple[Any, bool]:
    """(the annotation without Optional, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    if origin is typing.Annotated:
        return _plain(typing.get_args(annotation)[0])
    return annotation, False


def add_config_arguments(parser: argparse.ArgumentParser, config: type[BaseModel],
                         positional: tuple[str, ...] = (), prefix: str = "") -> None:
    """One argument per field of `config`: `positional` ones in order, the rest as `--field-name`
    (`--PREFIX-field-name` with a prefix, for a config nested in a command's own)."""
    from pydantic import SecretStr

    for name, field in config.model_fields.items():
        annotation, _ = _plain(field.annotation)
        help_text = field.description or ""
        if annotation is SecretStr:
            continue  # secrets come from the environment, never from a command line (shell history, ps)
        if name in positional:
            parser.add_argument(name, help=help_text)
            continue
        dest = f"{prefix}_{name}" if prefix else name
        flag = "--" + dest.replace("_", "-")
        required = field.is_required()
        default = None if required else field.default
        shown = "" if required or default is None else f" (default: {default})"
        if typing.get_origin(annotation) is list:
            parser.add_argument(flag, dest=dest, action="append", required=required, default=None,
                                metavar=name.upper(), help=help_text + " (repeatable)" + shown)
        elif annotation is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text + shown)
        elif typing.get_origin(annotation) is typing.Literal:
            parser.add_argument(flag, dest=dest, choices=[str(arg) for arg in typing.get_args(annotation)],
                                required=required, default=None, help=help_text + shown)
        elif annotation in _SCALARS or isinstance(annotation, type) and issubclass(annotation, _SCALARS):
            parser.add_argument(flag, dest=dest, required=required, default=None, metavar=name.upper(),
                                help=help_text + shown)
        else:
            raise TypeError(f"{config.__name__}.{name}: {annotation} has no command-line form")


def config_from_arguments(args: argparse.Namespace, config: type[BaseModel], command: str,
                          positional: tuple[str, ...] = (), prefix: str = "") -> BaseModel:
    """Validate the parsed arguments into `config`; unset flags keep the config's defaults, and `none`
    clears a field that may be None (an Optional limit: unbounded)."""
    def dest(name: str) -> str:
        return f"{prefix}_{name}" if prefix else name

    given = {name: getattr(args, dest(name)) for name in config.model_fields if getattr(args, dest(name), None) is not None}
    for name, value in given.items():
        if value == "none" and _plain(config.model_fields[name].annotation)[1]:
            given[name] = None
    try:
        return config.model_validate(given)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        flag = where if where in positional else "--" + dest(where).replace("_", "-")
        raise UserError(f"{command}: {flag}: {problem['msg'].removeprefix('Value error, ')}") from None
