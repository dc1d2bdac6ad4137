"""Options generated from the dataclasses that own their defaults: each compression command's
method options from the configs in the registry (:mod:`quantkit.registry`), the calibration
options from :class:`quantkit.data.CalibSpec`, ``quantkit distill``'s from
:class:`quantkit.distill.DistillConfig`.  No default is written here.

A config field ``damp: float = field(default=0.01, metadata={"help": ...})`` becomes
``--damp FLOAT`` with that help; ``int | None`` becomes ``INTEGER``; ``choices`` in the metadata
become a ``click.Choice``; a bool becomes a flag, or a ``--x/--no-x`` pair where some method of
the command defaults it on (``--sym/--asym`` by :data:`FLAGS`).  A command takes the union of
the fields of its methods' configs; the help shows each method's default, and only the options
the user gives reach the config (:func:`given`), so every other field keeps its config default.

The options are built when a command first needs them (parsing or ``--help``, see
:class:`GeneratedOptions`): the configs live behind torch, which ``quantkit --help`` and the
console script's start (``quantkit.memory.keep_triton_unloaded``) must not import.

    >>> [o.opts for o in method_options("prune", "sparsegpt")][:2]   # doctest: +SKIP
    [['--sparsity'], ['--pattern']]
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Callable

import click

# a field whose flags are not --field-name (and --no-field-name)
FLAGS = {"sym": ("--sym", "--asym"), "act_sym": ("--act-sym", "--act-asym")}
# config fields no command line takes: per-module settings, which a recipe gives (`quantkit run`)
RECIPE_ONLY = frozenset({"overrides", "ignore"})
# a CalibSpec field whose flag is not --field-name
CALIB_FLAGS = {"dataset": "--calib"}
_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING}


class GeneratedOptions(click.Command):
    """A click command whose options after the parameter ``after`` come from ``generate()``,
    called when the command first needs its parameters (so importing the CLI imports no config)."""

    def __init__(self, *args, generate: Callable[[], tuple[click.Parameter, ...]], after: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.generate, self.after = generate, after

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        at = next(i for i, p in enumerate(params) if p.name == self.after) + 1
        return [*params[:at], *self.generate(), *params[at:]]


def given(ctx: click.Context, names) -> dict:
    """The options among ``names`` the user gave (so the method's own defaults apply to the rest)."""
    src = click.core.ParameterSource
    return {n: ctx.params[n] for n in names if ctx.get_parameter_source(n) not in (src.DEFAULT, src.DEFAULT_MAP, None)}


def method_order(kind: str, first: str) -> list[str]:
    """The methods of ``kind``: the command's default ``first``, then the others by name."""
    from quantkit.api import method_names

    return [first] + [n for n in method_names(kind) if n != first]


def method_fields(kind: str, first: str) -> dict[str, list[tuple[str, dataclasses.Field, type]]]:
    """Field name -> ``[(method, field, type)]`` for every method of ``kind`` whose config has
    it (recipe-only fields left out), in :func:`method_order` and declaration order."""
    from quantkit.api import get_method

    out: dict[str, list] = {}
    for name in method_order(kind, first):
        cls = get_method(name).config_cls
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in RECIPE_ONLY:
                out.setdefault(f.name, []).append((name, f, _plain(hints[f.name])))
    return out


@functools.cache
def method_options(kind: str, first: str) -> tuple[click.Option, ...]:
    """The method options of the command for ``kind`` whose default method is ``first`` (built
    once: click must see the same objects while it parses)."""
    methods = method_order(kind, first)
    return tuple(_method_option(name, takers, methods) for name, takers in method_fields(kind, first).items())


@functools.cache
def calib_options() -> tuple[click.Option, ...]:
    """``--calib``, ``--nsamples``, ``--seqlen``, ``--seed``, ``--batch-size``: CalibSpec's fields,
    defaults and help (the values are the ``CalibSpec`` fields, ``dataset`` included)."""
    from quantkit.data import CalibSpec

    return config_options(CalibSpec, CALIB_FLAGS)


def config_options(cls, flags: dict[str, str] | None = None) -> tuple[click.Option, ...]:
    """One option per field of dataclass ``cls``, with the field's default and help (a bool field
    is a flag that is off unless given); ``flags`` renames fields' options (``{"dataset": "--calib"}``)."""
    hints, flags = typing.get_type_hints(cls), flags or {}
    out = []
    for f in dataclasses.fields(cls):
        tp, decl = _plain(hints[f.name]), flags.get(f.name, _flag(f.name))
        if tp is bool:
            out.append(click.Option([decl, f.name], is_flag=True, default=f.default, help=_help(f, cls.__name__)))
        else:
            out.append(click.Option([decl, f.name], type=_TYPES[tp], default=f.default, show_default=f.default is not None,
                                    help=_help(f, cls.__name__)))
    return tuple(out)


def bool_flags(name: str) -> tuple[str, str]:
    """The on and off flags of bool field ``name``: ``--x``/``--no-x``, or as :data:`FLAGS` says."""
    return FLAGS.get(name, (_flag(name), "--no-" + _flag(name)[2:]))


def _method_option(name: str, takers: list, methods: list[str]) -> click.Option:
    method, f, tp = takers[0]
    defaults = {m: fld.default for m, fld, _ in takers}
    if tp is bool:  # a pair where some method defaults it on; a plain flag (off unless given) otherwise
        on, off = bool_flags(name)
        pair = any(defaults.values())
        decls, kw = [f"{on}/{off}" if pair else on], {"is_flag": True}
        shown = {m: (on if v else off)[2:] for m, v in defaults.items()} if pair else {}
    elif tp in _TYPES:
        choices = f.metadata.get("choices")
        decls, kw = [_flag(name)], {"type": click.Choice(choices) if choices else _TYPES[tp]}
        shown = {m: v for m, v in defaults.items() if v is not None}
    else:
        raise TypeError(f"{method}: config field {name!r} of type {tp} has no command-line form; "
                        "give it one in quantkit.cli.options or list it in RECIPE_ONLY")
    text = _defaults_text(shown, methods)
    help_ = _help(f, method) + (f"  [default: {text}]" if text else "")
    return click.Option([*decls, name], default=None, help=help_, **kw)


def _defaults_text(shown: dict, methods: list[str]) -> str:
    """``4`` when every method of the command has that default, else ``4 (awq, gptq); 8 (smoothquant)``."""
    by_value: dict[str, list[str]] = {}
    for m, v in shown.items():
        by_value.setdefault(str(v), []).append(m)
    if len(by_value) == 1 and sorted(next(iter(by_value.values()))) == sorted(methods):
        return next(iter(by_value))
    return "; ".join(f"{v} ({', '.join(sorted(ms))})" for v, ms in by_value.items())


def _help(f: dataclasses.Field, owner: str) -> str:
    if not f.metadata.get("help"):
        raise TypeError(f"{owner}: field {f.name!r} has no help: declare it with "
                        "field(default=..., metadata={'help': ...})")
    return f.metadata["help"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _plain(tp):
    """``X | None`` -> ``X``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp
