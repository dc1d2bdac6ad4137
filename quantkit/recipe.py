"""YAML recipes: a list of compression steps run in order on one model.

    description: GPTQ 4-bit g64 with the first block at 8 bits
    calibration: {dataset: c4, nsamples: 128, seqlen: 512, seed: 0}
    steps:
      - method: gptq
        bits: 4
        group_size: 64
        act_order: true
        quantize_lm_head: true                      # the output head too (untied; embeddings stay float)
        ignore: ['mlp\\.down_proj$']               # left in float
        overrides:
          - {match: 'layers\\.0\\.', bits: 8}      # per-module format, by regex on the module name

A step's keys are ``method`` plus the fields of that method's config (the same registry the
CLI reads); ``overrides`` entries are ``match`` plus config fields.  The whole recipe is
validated before any model is loaded: an unknown key or a bad value is an error naming it, and
an order of steps in which one step's work would not reach the checkpoint is refused
(:func:`check_order`).  YAML is loaded with ``yaml.SafeLoader`` (no object construction), without
aliases and at most :data:`MAX_DEPTH` levels deep (:class:`RecipeLoader`).
"""

from __future__ import annotations

import difflib

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from quantkit.errors import QuantkitError, clip, excerpt

TOP_KEYS = {"description", "calibration", "steps"}
CALIB_KEYS = {"dataset": str, "nsamples": int, "seqlen": int, "seed": int, "batch_size": int}
MAX_DEPTH = 32  # a recipe nests 5 levels (steps, a step, overrides, an override, a value)


class RecipeLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader without what a hand-written recipe never needs and what costs
    memory or the stack: aliases (nine nested ``*a`` lists in 400 bytes expand to gigabytes) and
    nesting deeper than :data:`MAX_DEPTH` (the composer recurses once per level)."""

    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            raise QuantkitError(f"recipes may not use YAML anchors/aliases (line {line})")
        nested = isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent))
        if nested:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise QuantkitError(f"recipe nesting deeper than {MAX_DEPTH} levels (line {line})")
        try:
            return super().compose_node(parent, index)
        finally:
            if nested:
                self._depth -= 1


def _load_yaml(text: str):
    """``text`` as YAML through :class:`RecipeLoader`; yaml's and Python's own refusals (a
    5000-digit integer) raised as :class:`yaml.YAMLError`."""
    try:
        return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except ValueError as e:  # building a value: an int of over 4300 digits, a 13th month
        raise yaml.YAMLError(clip(str(e).split(";")[0], 120)) from None  # cut "; use sys.set_int_max_str_digits()"


@dataclass(frozen=True)
class Step:
    method: str
    config: object  # the method's frozen config dataclass


@dataclass(frozen=True)
class Recipe:
    description: str
    calibration: dict  # every CalibSpec field: the recipe's values, the defaults for the rest
    steps: tuple[Step, ...]
    source: dict  # the validated mapping, recorded in the checkpoint


def _field_types(config_cls) -> dict[str, tuple]:
    """Each config field's accepted types, from its annotation (``float | None`` -> ``(float, NoneType)``)."""
    hints = typing.get_type_hints(config_cls)
    out = {}
    for f in dataclasses.fields(config_cls):
        hint = hints[f.name]
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        out[f.name] = tuple(typing.get_origin(a) or a for a in args)
    return out


def _type_ok(value, kinds: tuple) -> bool:
    for kind in kinds:
        if kind is type(None) or kind is bool:
            ok = value is None if kind is type(None) else isinstance(value, bool)
        elif isinstance(value, bool):
            ok = False
        elif kind is float:
            ok = isinstance(value, (int, float))
        else:
            ok = not isinstance(kind, type) or isinstance(value, (list, tuple) if kind is tuple else kind)
        if ok:
            return True
    return False


def _checked(where: str, key: str, value, kinds: tuple):
    """``value`` if its type fits the field (checked here, so a config never quotes a bomb)."""
    if not _type_ok(value, kinds):
        name = next(k.__name__ for k in kinds if k is not type(None))
        raise QuantkitError(f"{where}.{key} must be a {name}, got {excerpt(value)}")
    return value


def _build_step(i: int, raw) -> Step:
    from quantkit.api import get_method

    where = f"steps[{i}]"
    if not isinstance(raw, dict):
        raise QuantkitError(f"{where} must be a mapping with a 'method' key")
    if "method" not in raw:
        raise QuantkitError(f"{where} has no 'method'")
    method = raw["method"]
    if not isinstance(method, str):
        raise QuantkitError(f"{where}.method must be a string")
    cls = get_method(method)
    kinds = _field_types(cls.config_cls)
    options = {}
    for key, value in raw.items():
        if key == "method":
            continue
        if key not in kinds:
            close = difflib.get_close_matches(str(key)[:100], sorted(kinds), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"its {len(kinds)} options are in its command's --help"
            raise QuantkitError(f"{where}: unknown key {excerpt(key)} for method {method!r} ({hint})")
        if key == "overrides":
            value = _overrides(where, value, kinds)
        elif key == "ignore":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise QuantkitError(f"{where}.ignore must be a list of regexes")
            value = tuple(value)
        options[key] = _checked(where, key, value, kinds[key])
    try:
        config = cls.config_cls(**options)
    except (QuantkitError, TypeError, ValueError) as e:  # one short line, whatever the config quotes
        raise QuantkitError(clip(f"{where}: {e}")) from None
    return Step(method, config)


def _overrides(where: str, value, kinds: dict) -> tuple:
    if not isinstance(value, list):
        raise QuantkitError(f"{where}.overrides must be a list of {{match: REGEX, ...}} mappings")
    out = []
    for j, o in enumerate(value):
        if not isinstance(o, dict) or "match" not in o:
            raise QuantkitError(f"{where}.overrides[{j}] needs a 'match' regex")
        rest = {k: v for k, v in o.items() if k != "match"}
        for k, v in rest.items():
            if k not in kinds or k in ("overrides", "ignore"):
                raise QuantkitError(f"{where}.overrides[{j}]: unknown key {excerpt(k)}")
            _checked(f"{where}.overrides[{j}]", k, v, kinds[k])
        out.append((o["match"], rest))
    return tuple(out)


def _calibration(calib) -> dict:
    """The recipe's ``calibration`` mapping, checked as the CLI's calibration options are, with
    :class:`quantkit.data.CalibSpec`'s defaults (the one set of them) for the keys it leaves out."""
    from quantkit.data import CalibSpec, check_calibration_size, check_seed

    if not isinstance(calib, dict):
        raise QuantkitError("calibration must be a mapping")
    for k, v in calib.items():
        if k not in CALIB_KEYS:
            raise QuantkitError(f"calibration: unknown key {excerpt(k)} (allowed: {', '.join(sorted(CALIB_KEYS))})")
        if not isinstance(v, CALIB_KEYS[k]) or isinstance(v, bool):
            raise QuantkitError(f"calibration.{k} must be a {CALIB_KEYS[k].__name__}, got {excerpt(v)}")
        if CALIB_KEYS[k] is int and k != "seed" and v < 1:
            raise QuantkitError(f"calibration.{k} must be positive, got {excerpt(v)}")
    full = {**dataclasses.asdict(CalibSpec()), **calib}
    check_calibration_size(full["nsamples"], full["seqlen"])
    check_seed(full["seed"])
    return full


def parse_recipe(data) -> Recipe:
    if not isinstance(data, dict):
        raise QuantkitError("a recipe must be a YAML mapping with a 'steps' list")
    unknown = set(data) - TOP_KEYS
    if unknown:
        names = sorted(clip(k, 60) if isinstance(k, str) else excerpt(k) for k in unknown)
        raise QuantkitError(f"unknown recipe key(s) {', '.join(names)} (allowed: {', '.join(sorted(TOP_KEYS))})")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise QuantkitError("a recipe needs a non-empty 'steps' list")
    calib = _calibration(data.get("calibration") or {})
    description = data.get("description", "")
    if not isinstance(description, str):
        raise QuantkitError("description must be a string")
    built = tuple(_build_step(i, s) for i, s in enumerate(steps))
    check_order(built)
    return Recipe(description, calib, built, copy.deepcopy(data))


def _set_value(name: str, raw: str):
    """The value of ``--set NAME=RAW``, parsed as YAML the way the recipe is."""
    try:
        return _load_yaml(raw)
    except yaml.YAMLError as e:
        raise QuantkitError(f"--set {name}: {excerpt(raw)} is not a YAML value ({clip(str(getattr(e, 'problem', None) or e), 120)})") from None
    except QuantkitError as e:
        raise QuantkitError(f"--set {name}: {e}") from None


def _set(data: dict, assignment: str) -> None:
    """Apply ``--set steps.0.group_size=-1`` (the value parsed as YAML)."""
    if "=" not in assignment:
        raise QuantkitError(f"--set wants KEY=VALUE, got {excerpt(assignment)}")
    path, raw = assignment.split("=", 1)
    name = clip(path, 80)  # how messages name the key
    value = _set_value(name, raw)
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError):
                raise QuantkitError(f"--set {name}: no item {excerpt(part)}") from None
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise QuantkitError(f"--set {name}: {excerpt(part)} is inside a {type(node).__name__}, not a mapping or list")
    last = parts[-1]
    if not isinstance(node, (list, dict)):
        raise QuantkitError(f"--set {name}: {excerpt(last)} is inside a {type(node).__name__}, not a mapping or list")
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (ValueError, IndexError):
            raise QuantkitError(f"--set {name}: no item {excerpt(last)}") from None
    else:
        node[last] = value


def load_recipe(path: str | Path, sets: tuple[str, ...] = ()) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise QuantkitError(f"recipe {path} does not exist")
    try:
        data = _load_yaml(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        why = clip(str(getattr(e, "problem", None) or e), 120)  # one line, whatever yaml raised
        raise QuantkitError(f"recipe {path} is not valid YAML{where}: {why}") from None
    except QuantkitError as e:  # an alias or too deep: see RecipeLoader
        raise QuantkitError(f"recipe {path}: {e}") from None
    except UnicodeDecodeError:
        raise QuantkitError(f"recipe {path} is not UTF-8 text") from None
    if isinstance(data, dict):
        for s in sets:
            _set(data, s)
    return parse_recipe(data)


def check_order(steps: tuple[Step, ...]) -> None:
    """Refuse, before any model is loaded, steps in an order in which one step's work would not
    reach the checkpoint.

    :func:`run_recipe` keeps each linear's last stored result (codes, W8A8 weights, low-rank
    factors, packed N:M) and :func:`quantkit.api.save` packs those: a linear's float weight is
    saved only where no step stored one.  A later step's change to a float weight is therefore
    lost where an earlier step stored that linear and the later step does not store it again:

    - a pruning step that stores nothing (its zeros are in the float weights) after a step that
      stores: prune first;
    - a step folding scales (AWQ, SmoothQuant) that ignores linears an earlier storing step did
      not ignore: it scales the ignored linears too, so their stored results would no longer fit;
    - any step after a low-rank one: the factorized linears have no dense weight left to write.

    Later steps that store every linear they change (gptq then rtn 8-bit, gptq then smoothquant,
    gptq then svd) compress the earlier step's rounded weights again; that is accepted."""
    from quantkit.api import get_method

    _check_rotation(steps)
    methods = [get_method(s.method)(s.config) for s in steps]
    for j, later in enumerate(methods):
        for i, earlier in enumerate(methods[:j]):
            lost = _lost_work(earlier, later, f"steps[{i}] ({steps[i].method})", f"steps[{j}] ({steps[j].method})")
            if lost:
                raise QuantkitError(f"{lost[0]}; {lost[1]}: steps [{steps[j].method}, {steps[i].method}]")


def _check_rotation(steps: tuple[Step, ...]) -> None:
    """One rotation at most (a ``rotate`` step or ``rotate: true``), in the first step: it rewrites
    every weight, so what an earlier step did would be undone."""
    rotating = [i for i, s in enumerate(steps) if getattr(s.config, "rotate", False)]
    if len(rotating) > 1:
        i, j = rotating[:2]
        raise QuantkitError(f"steps[{i}] ({steps[i].method}) and steps[{j}] ({steps[j].method}) both rotate the model: rotate once")
    if rotating and rotating[0] > 0:
        j = rotating[0]
        raise QuantkitError(f"steps[{j}] ({steps[j].method}) rotates the model after steps[0] ({steps[0].method}), "
                            "whose work the rotation would undo: rotate in the first step")


def _lost_work(earlier, later, first: str, then: str) -> tuple[str, str] | None:
    """``(what would be lost, the fix)`` if ``later`` running after ``earlier`` loses work (see
    :func:`check_order`), else ``None``."""
    if earlier.swaps_linears:
        return (f"{then} comes after the low-rank step {first}, whose factorized linears no later step can change",
                "put the low-rank step last")
    if not earlier.stores_results:
        return None
    if not later.stores_results:
        return (f"{then} prunes after {first} stored its compressed weights, which the checkpoint keeps: "
                "the zeros would be lost", "prune first")
    stale = sorted(set(getattr(later.config, "ignore", ())) - set(getattr(earlier.config, "ignore", ())))
    if later.folds_scales and stale:
        return (f"{then} folds its scales into the linears it ignores ({excerpt(stale)}), which {first} stored, "
                "so their stored weights would no longer match", f"ignore them in {first} too, or fold first")
    return None


def run_recipe(recipe: Recipe, model, tokenizer, progress=None, device=None):
    """Run every step on ``model`` in place; returns the merged :class:`CompressionResult`
    (``device``: where each block computes, see :func:`quantkit.api.compress`)."""
    from quantkit import api
    from quantkit.core.types import CompressionResult
    from quantkit.data import calibration_samples, check_context

    calib = recipe.calibration
    if any(api.get_method(step.method).calibrates(step.config) for step in recipe.steps):
        check_context(calib["seqlen"], model.config, name="calibration.seqlen")
    calib_ids = None
    merged = CompressionResult()
    for i, step in enumerate(recipe.steps):
        method = api.get_method(step.method)
        if method.calibrates(step.config) and calib_ids is None:
            calib_ids = calibration_samples(tokenizer, calib["dataset"], calib["nsamples"], calib["seqlen"], calib["seed"])
        res = api.compress(model, step.method, step.config, calib_ids=calib_ids, batch_size=calib["batch_size"],
                           device=device, progress=(lambda a, b, info, i=i: progress(i, a, b, info)) if progress else None)
        merged.quantized.update(res.quantized)  # a linear's last stored result wins (see check_order)
        merged.log.extend(res.log)
        merged.extra.setdefault("steps", []).append({"method": step.method, **res.extra})
        merged.extra["config"] = res.extra.get("config", {})
        for key in ("rotation", "allocation"):  # whole-model records: the checkpoint's (allocation.json for a budget)
            if key in res.extra:
                merged.extra[key] = res.extra[key]
    return merged
