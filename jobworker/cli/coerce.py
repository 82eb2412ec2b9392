"""Conversion of the command line's parameter values without pydantic.

typer 0.29 converts every parameter's value through a pydantic ``TypeAdapter``, built on first
use: for one ``jobworker status ID`` that means importing pydantic and building adapters, about
70 ms, several times the interpreter's own start. Parameters of the types this CLI uses
(``str``, ``bool``, ``int``, ``float``, ``Path``, enums, lists of ``str`` or of an enum, and
each of these or ``None``) get a converter here instead, made of typer's own checks for paths
and choices, which need no pydantic. Every other parameter, and every value these cannot take
(an invalid number or choice, a number out of range, for typer's own error message), keeps
typer's conversion.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin

from typer._click.core import Command, Context
from typer._coercion import RuntimeParam, build_runtime_param
from typer._param_types import coerce_cli_choice, coerce_cli_path
from typer.core import TyperArgument, TyperGroup, TyperOption

if TYPE_CHECKING:
    from typer.core import _TyperParameter
    from typer.models import ParameterInfo

__all__ = ["install"]

_Param = TyperArgument | TyperOption


class _Unhandled(Exception):
    """The value is left to typer's own conversion."""


_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)")


def _number(annotation: type[int] | type[float], info: ParameterInfo, value: Any) -> Any:
    if isinstance(value, str):
        if not (_INTEGER if annotation is int else _DECIMAL).fullmatch(value):
            raise _Unhandled
        value = annotation(value)
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise _Unhandled
    low, high = info.min, info.max
    if (low is not None and value < low) or (high is not None and value > high):
        raise _Unhandled
    return annotation(value)


def _leaf(annotation: Any, info: ParameterInfo, value: Any, param: _Param, ctx: Context) -> Any:
    if annotation is str and isinstance(value, str):
        return value
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is int or annotation is float:
        return _number(annotation, info, value)
    if annotation is Path and isinstance(value, str | Path):
        return coerce_cli_path(Path(value), info, path_type=Path, param=param, ctx=ctx)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        try:
            return coerce_cli_choice(
                value, choices=tuple(annotation), case_sensitive=info.case_sensitive, ctx=ctx
            )
        except ValueError:
            raise _Unhandled from None
    raise _Unhandled


@dataclass(frozen=True)
class _Plain(RuntimeParam):
    def _coerce_value(self, value: Any, param: _TyperParameter, ctx: Context) -> Any:
        assert isinstance(param, _Param)
        info = self.parameter_info
        annotation: Any = _optional(self.annotation)
        if value is None and annotation is not self.annotation:
            return None
        try:
            if get_origin(annotation) is list:
                if not isinstance(value, list | tuple):
                    raise _Unhandled
                (item_type,) = get_args(annotation)
                return [_leaf(item_type, info, item, param, ctx) for item in value]
            return _leaf(annotation, info, value, param, ctx)
        except _Unhandled:
            return build_runtime_param(param.type_descriptor)._coerce_value(value, param, ctx)


def _optional(annotation: Any) -> Any:
    """``X`` of ``X | None``; else ``annotation`` itself."""
    if get_origin(annotation) in (Union, UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1 and len(get_args(annotation)) == 2:
            return args[0]
    return annotation


def _leaf_type(annotation: Any) -> bool:
    if annotation in (str, bool, int, float, Path):
        return True
    return isinstance(annotation, type) and issubclass(annotation, Enum)


def _handled(param: _Param) -> bool:
    descriptor = param.type_descriptor
    info = descriptor.parameter_info
    if info.parser is not None or descriptor.file_annotation is not None:
        return False
    if info.path_type is not None or info.clamp:
        return False
    annotation: Any = _optional(descriptor.annotation)
    if get_origin(annotation) is list:
        args = get_args(annotation)
        return len(args) == 1 and args[0] is not bool and _leaf_type(args[0])
    return _leaf_type(annotation)


def install(command: Command, help_names: Sequence[str]) -> None:
    """Give the parameters of ``command`` and of all its subcommands that this module handles
    its converter, including the help option (``help_names``) each command makes on first
    use."""
    help_option = command.get_help_option(Context(command, help_option_names=list(help_names)))
    for param in [*command.params, help_option]:
        if isinstance(param, _Param) and param._runtime_param is None and _handled(param):
            descriptor = param.type_descriptor
            param._runtime_param = _Plain(descriptor.parameter_info, descriptor.annotation)
    if isinstance(command, TyperGroup):
        for sub in command.commands.values():
            install(sub, help_names)
