"""The method and calibration options are generated from the configs and CalibSpec: every field of
every registered method is an option of its command, no default is written in the CLI, the help
states each method's own default, and an option the chosen method does not take is refused."""

import dataclasses
import re
import typing
from dataclasses import dataclass, field

import click
import pytest
from click.testing import CliRunner

from quantkit.cli import cli, compress
from quantkit.cli.options import RECIPE_ONLY, bool_flags, calib_options, method_options
from quantkit.data import CalibSpec
from quantkit.api import get_method, method_names

COMMANDS = {"quantize": compress.QUANTIZE, "prune": compress.PRUNE, "lowrank": compress.LOWRANK}
TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING}


def _options(kind) -> dict[str, click.Option]:
    return {o.name: o for o in method_options(kind.name, kind.default)}


def _plain(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


@pytest.mark.parametrize("method", method_names())
def test_every_config_field_of_every_method_is_an_option_of_its_command(method):
    cls = get_method(method)
    kind = COMMANDS[getattr(cls, "kind", "quantize")]
    options = _options(kind)
    hints = typing.get_type_hints(cls.config_cls)
    for f in dataclasses.fields(cls.config_cls):
        assert f.metadata.get("help"), f"{method}.{f.name} has no help"
        if f.name in RECIPE_ONLY:
            assert f.name not in options
            continue
        assert f.name in options, f"{method}.{f.name} has no option in `quantkit {kind.name}`"
        opt, tp = options[f.name], _plain(hints[f.name])
        assert opt.default is None, f"--{f.name} has a default written in the CLI"
        if tp is bool:
            on, off = bool_flags(f.name)
            assert opt.is_flag and opt.opts == [on]
            assert opt.secondary_opts == ([off] if any(o is True for o in _defaults(kind, f.name).values()) else [])
            if opt.secondary_opts:
                assert _states_default(opt.help, on[2:] if f.default else off[2:], method), opt.help
        else:
            choices = f.metadata.get("choices")
            assert opt.opts == ["--" + f.name.replace("_", "-")]
            assert (list(opt.type.choices) == list(choices)) if choices else opt.type is TYPES[tp]
            if f.default is not None:
                assert _states_default(opt.help, f.default, method), opt.help


def _states_default(help_: str, value, method: str) -> bool:
    """The help ends ``[default: V]`` (every method's), or ``[default: V (m1, m2); W (m3)]`` with
    ``method`` among those listed for ``value``."""
    m = re.search(r"\[default: (.*)\]$", help_)
    if not m:
        return False
    if m.group(1) == str(value):
        return True
    return any(part.startswith(f"{value} (") and method in part[len(str(value)) + 2:-1].split(", ")
               for part in m.group(1).split("; "))


def _defaults(kind, name) -> dict:
    out = {}
    for m in method_names(kind.name):
        fields = {f.name: f for f in dataclasses.fields(get_method(m).config_cls)}
        if name in fields:
            out[m] = fields[name].default
    return out


@pytest.mark.parametrize("kind", list(COMMANDS.values()), ids=list(COMMANDS))
def test_a_command_takes_exactly_the_union_of_its_methods_fields_and_writes_no_default(kind):
    union = {f.name for m in method_names(kind.name) for f in dataclasses.fields(get_method(m).config_cls)} - RECIPE_ONLY
    assert set(_options(kind)) == union
    command = cli.commands[kind.name]
    params = {p.name for p in command.get_params(click.Context(command))}
    assert union | {f.name for f in dataclasses.fields(CalibSpec)} <= params
    written = {p.name for p in command.params}  # declared by hand in quantkit.cli.compress
    assert not written & (union | {f.name for f in dataclasses.fields(CalibSpec)}), "a generated option is also written by hand"


def test_calibration_options_come_from_calibspec():
    opts = {o.name: o for o in calib_options()}
    assert set(opts) == {f.name for f in dataclasses.fields(CalibSpec)}
    assert opts["dataset"].opts == ["--calib"]
    for f in dataclasses.fields(CalibSpec):
        assert opts[f.name].default == f.default and opts[f.name].help == f.metadata["help"]


def test_awq_gptq_help_states_its_own_act_order_and_clip_defaults():
    options = _options(compress.QUANTIZE)
    assert "act-order (gptq)" in options["act_order"].help and "no-act-order (awq+gptq)" in options["act_order"].help
    assert "clip (awq)" in options["clip"].help and "no-clip (awq+gptq)" in options["clip"].help
    r = CliRunner().invoke(cli, ["quantize", "--help"], terminal_width=400)
    assert r.exit_code == 0
    line = next(line for line in r.output.splitlines() if line.strip().startswith("--act-order"))
    assert "no-act-order (awq+gptq)" in line and "[default: act-order]" not in line


@pytest.mark.parametrize("args,message", [
    (["quantize", "--method", "rtn", "--n-grid", "5"], "method 'rtn' does not take n_grid"),
    (["quantize", "--method", "gptq", "--no-clip"], "method 'gptq' does not take clip"),
    (["quantize", "--method", "smoothquant", "--act-order"], "method 'smoothquant' does not take act_order"),
    (["prune", "--method", "magnitude", "--damp", "0.1"], "method 'magnitude' does not take damp"),
    (["lowrank", "--method", "svd", "--alpha", "0.3"], "--alpha only apply to --method asvd"),
])
def test_an_option_the_method_does_not_take_is_refused_in_one_line(args, message, stories_dir, tmp_path):
    r = CliRunner().invoke(cli, [args[0], str(stories_dir), "-o", str(tmp_path / "out"), *args[1:]])
    assert r.exit_code == 1 and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_only_the_options_given_reach_the_config(monkeypatch, stories_dir, tmp_path):
    """The config's own defaults apply to everything else (awq+gptq keeps act_order=False)."""
    from quantkit import api
    from quantkit.errors import QuantkitError

    seen = []

    def make_config(method, options):
        seen.append((method, dict(options), get_method(method).config_cls(**options)))
        raise QuantkitError("stop")

    monkeypatch.setattr(api, "make_config", make_config)
    for args in (["--method", "awq+gptq", "--bits", "3"], ["--method", "gptq", "--asym", "--no-act-order", "--damp", "0.05"]):
        r = CliRunner().invoke(cli, ["quantize", str(stories_dir), "-o", str(tmp_path / "out"), *args])
        assert r.exit_code == 1 and "stop" in r.output
    assert seen[0][:2] == ("awq+gptq", {"bits": 3})
    assert seen[0][2].act_order is False and seen[0][2].clip is False and seen[0][2].group_size == 128
    assert seen[1][:2] == ("gptq", {"sym": False, "act_order": False, "damp": 0.05})


def test_a_new_config_field_gets_an_option_or_fails_loudly(monkeypatch):
    """A field is an option as soon as it is declared; one without help, or of a type the command
    line cannot spell, stops the CLI instead of being skipped."""
    from quantkit import registry

    @dataclass(frozen=True)
    class Good:
        level: int = field(default=3, metadata={"help": "How hard."})
        fast: bool = field(default=True, metadata={"help": "Go fast."})

    @dataclass(frozen=True)
    class NoHelp:
        level: int = 3

    @dataclass(frozen=True)
    class Odd:
        table: dict = field(default=None, metadata={"help": "A mapping."})

    for i, (cls, error) in enumerate([(Good, None), (NoHelp, "has no help"), (Odd, "no command-line form")]):
        kind = f"test-kind-{cls.__name__}"
        method = type(f"M{i}", (), {"kind": kind, "needs_calibration": False})
        monkeypatch.setitem(registry._METHODS, f"test-{i}", method)
        method.name, method.config_cls = f"test-{i}", cls
        if error:
            with pytest.raises(TypeError, match=error):
                method_options(kind, f"test-{i}")
        else:
            opts = {o.name: o for o in method_options(kind, f"test-{i}")}
            assert opts["level"].opts == ["--level"] and opts["level"].help == "How hard.  [default: 3]"
            assert opts["fast"].secondary_opts == ["--no-fast"] and opts["fast"].help.endswith("[default: fast]")


def test_distill_options_come_from_distillconfig_and_reach_it(monkeypatch, tmp_path):
    """`quantkit distill` writes no default: every option is a DistillConfig field with its default
    and help, and what the user gives (and only that) reaches the config."""
    from quantkit import distill as kd

    command = cli.commands["distill"]
    params = {p.name: p for p in command.get_params(click.Context(command))}
    for f in dataclasses.fields(kd.DistillConfig):
        assert params[f.name].default == f.default and params[f.name].help.startswith(f.metadata["help"])
    assert not {p.name for p in command.params} & {f.name for f in dataclasses.fields(kd.DistillConfig)}

    seen = []

    def stop(self):
        seen.append(self.cfg)
        raise kd.QuantkitError("stop here")

    monkeypatch.setattr("quantkit.cli.jobs.DistillJob.load", stop)
    r = CliRunner().invoke(cli, ["distill", "--teacher", "t", "--student", str(tmp_path), "-o", str(tmp_path / "o"),
                                 "--lr", "3e-4", "--warmup", "5"])
    assert r.exit_code == 1 and "stop here" in r.output, r.output
    assert seen == [kd.DistillConfig(lr=3e-4, warmup=5)]
    r = CliRunner().invoke(cli, ["distill", "--teacher", "t", "--student", str(tmp_path), "-o", str(tmp_path / "o"),
                                 "--temperature", "0"])
    assert r.exit_code == 1 and "--temperature must be positive" in r.output
