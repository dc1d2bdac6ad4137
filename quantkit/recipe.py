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
validated before any model is loaded: an unknown key or a bad value is an error naming it.
YAML is loaded with ``yaml.safe_load`` (no object construction).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError

TOP_KEYS = {"description", "calibration", "steps"}
CALIB_KEYS = {"dataset": str, "nsamples": int, "seqlen": int, "seed": int, "batch_size": int}


@dataclass(frozen=True)
class Step:
    method: str
    config: object  # the method's frozen config dataclass


@dataclass(frozen=True)
class Recipe:
    description: str
    calibration: dict
    steps: tuple[Step, ...]
    source: dict  # the validated mapping, recorded in the checkpoint


def _type_ok(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, tuple):
        return isinstance(value, (list, tuple))
    return True


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
    fields = {f.name: f for f in dataclasses.fields(cls.config_cls)}
    options = {}
    for key, value in raw.items():
        if key == "method":
            continue
        if key not in fields:
            raise QuantkitError(f"{where}: unknown key {key!r} for method {method!r} (allowed: {', '.join(sorted(fields))})")
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else None
        if key == "overrides":
            value = _overrides(where, value, fields)
        elif key == "ignore":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise QuantkitError(f"{where}.ignore must be a list of regexes")
            value = tuple(value)
        elif default is not None and not _type_ok(value, default):
            raise QuantkitError(f"{where}.{key} must be a {type(default).__name__}, got {value!r}")
        options[key] = value
    try:
        config = cls.config_cls(**options)
    except QuantkitError as e:
        raise QuantkitError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise QuantkitError(f"{where}: {e}") from None
    return Step(method, config)


def _overrides(where: str, value, fields: dict) -> tuple:
    if not isinstance(value, list):
        raise QuantkitError(f"{where}.overrides must be a list of {{match: REGEX, ...}} mappings")
    out = []
    for j, o in enumerate(value):
        if not isinstance(o, dict) or "match" not in o:
            raise QuantkitError(f"{where}.overrides[{j}] needs a 'match' regex")
        rest = {k: v for k, v in o.items() if k != "match"}
        for k in rest:
            if k not in fields or k in ("overrides", "ignore"):
                raise QuantkitError(f"{where}.overrides[{j}]: unknown key {k!r}")
        out.append((o["match"], rest))
    return tuple(out)


def parse_recipe(data) -> Recipe:
    if not isinstance(data, dict):
        raise QuantkitError("a recipe must be a YAML mapping with a 'steps' list")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise QuantkitError(f"unknown recipe key(s) {', '.join(sorted(' '.join(str(k).split()) for k in unknown))} (allowed: {', '.join(sorted(TOP_KEYS))})")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise QuantkitError("a recipe needs a non-empty 'steps' list")
    calib = data.get("calibration") or {}
    if not isinstance(calib, dict):
        raise QuantkitError("calibration must be a mapping")
    for k, v in calib.items():
        if k not in CALIB_KEYS:
            raise QuantkitError(f"calibration: unknown key {k!r} (allowed: {', '.join(sorted(CALIB_KEYS))})")
        if not isinstance(v, CALIB_KEYS[k]) or isinstance(v, bool):
            raise QuantkitError(f"calibration.{k} must be a {CALIB_KEYS[k].__name__}, got {v!r}")
        if CALIB_KEYS[k] is int and k != "seed" and v < 1:
            raise QuantkitError(f"calibration.{k} must be positive, got {v}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise QuantkitError("description must be a string")
    return Recipe(description, dict(calib), tuple(_build_step(i, s) for i, s in enumerate(steps)), copy.deepcopy(data))


def _set(data: dict, assignment: str) -> None:
    """Apply ``--set steps.0.group_size=-1`` (the value parsed as YAML)."""
    import yaml

    if "=" not in assignment:
        raise QuantkitError(f"--set wants KEY=VALUE, got {assignment!r}")
    path, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise QuantkitError(f"--set {path}: {raw!r} is not a YAML value ({' '.join(str(getattr(e, 'problem', e)).split())})") from None
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError):
                raise QuantkitError(f"--set {path}: no item {part!r}") from None
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise QuantkitError(f"--set {path}: {part!r} is inside a {type(node).__name__}, not a mapping or list")
    last = parts[-1]
    if not isinstance(node, (list, dict)):
        raise QuantkitError(f"--set {path}: {last!r} is inside a {type(node).__name__}, not a mapping or list")
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (ValueError, IndexError):
            raise QuantkitError(f"--set {path}: no item {last!r}") from None
    else:
        node[last] = value


def load_recipe(path: str | Path, sets: tuple[str, ...] = ()) -> Recipe:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise QuantkitError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        why = " ".join(str(getattr(e, "problem", None) or e).split())  # one line, whatever yaml raised
        raise QuantkitError(f"recipe {path} is not valid YAML{where}: {why}") from None
    except UnicodeDecodeError:
        raise QuantkitError(f"recipe {path} is not UTF-8 text") from None
    if isinstance(data, dict):
        for s in sets:
            _set(data, s)
    return parse_recipe(data)


def run_recipe(recipe: Recipe, model, tokenizer, progress=None):
    """Run every step on ``model`` in place; returns the merged :class:`CompressionResult`."""
    from quantkit import api
    from quantkit.core.types import CompressionResult
    from quantkit.data import CalibSpec, calibration_samples

    calib = {**dataclasses.asdict(CalibSpec()), **recipe.calibration}  # the one set of calibration defaults
    calib_ids = None
    merged = CompressionResult()
    for i, step in enumerate(recipe.steps):
        method = api.get_method(step.method)
        if method.needs_calibration and calib_ids is None:
            calib_ids = calibration_samples(tokenizer, calib["dataset"], calib["nsamples"], calib["seqlen"], calib["seed"])
        res = api.compress(model, step.method, step.config, calib_ids=calib_ids, batch_size=calib["batch_size"],
                           progress=(lambda a, b, info, i=i: progress(i, a, b, info)) if progress else None)
        merged.quantized.update(res.quantized)
        merged.log.extend(res.log)
        merged.extra.setdefault("steps", []).append({"method": step.method, **res.extra})
        merged.extra["config"] = res.extra.get("config", {})
    return merged
