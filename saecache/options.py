"""Click options generated from a config dataclass: each field's flag, type, default and help come from the field and
the docstring written under it, so a field has one name and one default everywhere and `--help` cannot drift from
the config. Every stage's command line is built with `config_options`; the commands only add what is not a config
field (arguments, storage options, output switches).

Conventions: a field `batch_size` is the flag `--batch-size`; a bool field is a `--name/--no-name` switch; a
`tuple[str, ...]` field takes comma-separated values; a list field (or a field marked `multiple`) is given by
repeating its flag; an `X | None` field also takes the value `none`. A flag renamed to match its field keeps the old
name as an alias (`aliases`).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from functools import lru_cache
from typing import Any, Callable

import click

_MISSING = dataclasses.MISSING


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring, whitespace collapsed} from the string literal written under each field of `cls` (and
    of its dataclass bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_default(cls: type, name: str) -> Any:
    """The dataclass default of field `name` (calling its default factory); `dataclasses.MISSING` when required."""
    f = cls.__dataclass_fields__[name]
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


class _Optional(click.ParamType):
    """A value of `base`, or `none` for None."""

    def __init__(self, base: click.ParamType):
        self.base, self.name = base, base.name

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            return None
        return self.base.convert(value, param, ctx)


class _CommaList(click.ParamType):
    """Comma-separated values → a tuple (e.g. `--hooks mlp_out.0,mlp_out.1`, `--widths 512,1024`)."""

    def __init__(self, item: click.ParamType = click.STRING):
        self.item, self.name = item, "a,b,…"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return tuple(self.item.convert(v, param, ctx) for v in value)
        return tuple(self.item.convert(v.strip(), param, ctx) for v in str(value).split(",") if v.strip())


_SCALARS = {int: click.INT, float: click.FLOAT, str: click.STRING}


def _param_type(hint) -> tuple[click.ParamType | None, bool, bool]:
    """(click type, is a list given by repetition, is a bool switch) of a resolved type hint."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    if optional and len(args) == 1:
        inner, multiple, switch = _param_type(args[0])
        return (inner if switch or multiple else _Optional(inner)), multiple, switch
    origin = typing.get_origin(hint)
    if hint is bool:
        return None, False, True
    if hint in _SCALARS:
        return _SCALARS[hint], False, False
    if origin is tuple and typing.get_args(hint)[1:] == (Ellipsis,) and typing.get_args(hint)[0] in _SCALARS:
        return _CommaList(_SCALARS[typing.get_args(hint)[0]]), False, False
    if origin is list and typing.get_args(hint)[0] in _SCALARS:
        return _SCALARS[typing.get_args(hint)[0]], True, False
    raise TypeError(f"no command-line type for {hint!r}: skip the field or pass it with `types`")


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)


def config_options(cls: type, *, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
                   flags: dict[str, str] | None = None, aliases: dict[str, tuple[str, ...]] | None = None,
                   multiple: tuple[str, ...] = (), types: dict[str, click.ParamType] | None = None,
                   defaults: bool = True) -> Callable:
    """A decorator adding one click option per field of dataclass `cls` (minus `skip`, or only `only`).

    `flags` renames a field's flag (``{"stores": "--store"}``); `aliases` adds old names; `multiple` makes a scalar
    field repeatable (a sweep); `types` overrides the generated click type. The parameter name passed to the
    command is always the field name. With `defaults=False` every option defaults to None (the command can tell
    "not given" from a value, e.g. to override a config file) and `--help` still shows the dataclass default.
    Fields without a default are required (unless `defaults=False`).
    """
    flags, aliases, types = flags or {}, aliases or {}, types or {}
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip and (only is None or f.name in only)]
    unknown = (set(flags) | set(aliases) | set(multiple) | set(types) | set(only or ()) | set(skip)) - set(hints)
    assert not unknown, f"not fields of {cls.__name__}: {sorted(unknown)}"

    def decorate(fn: Callable) -> Callable:
        for name in reversed(names):  # click lists options in decorator order: apply bottom-up
            fn = _option(cls, name, hints[name], docs.get(name, ""), flags.get(name), aliases.get(name, ()),
                         name in multiple, types.get(name), defaults)(fn)
        return fn
    return decorate


def _option(cls, name, hint, doc, flag, alias, multiple, ptype, defaults) -> Callable:
    ptype, is_list, switch = (ptype, False, False) if ptype is not None else _param_type(hint)
    default = field_default(cls, name)
    required = default is _MISSING and defaults
    flag = flag or "--" + name.replace("_", "-")
    decls = [flag, *alias]
    kw: dict[str, Any] = dict(help=doc, show_default=defaults)
    if switch and not multiple:
        off = "--no-" + flag[2:]
        decls = [f"{flag}/{off}", *(f"{a}/--no-{a[2:]}" for a in alias)]
        kw["default"] = default if defaults and default is not _MISSING else None
    else:
        kw["type"] = ptype
        if is_list or multiple:
            kw["multiple"] = True
            kw["help"] = f"{doc} Repeat the flag for " + ("a sweep." if multiple else "several.")
            kw["default"] = tuple(default) if defaults and default not in (_MISSING, None) and is_list else ()
        else:
            kw["default"] = default if defaults and default is not _MISSING else None
        kw["required"] = required
    if not defaults and default not in (_MISSING, None, ""):  # click shows nothing for a None default: say it here
        kw["help"] = f"{kw['help']}  [default: {_show(default)}]"
    return click.option(*decls, name, **kw)
