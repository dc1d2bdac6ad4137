"""The jobs :func:`quantkit.cli.compress.execute` runs: one per command that writes a compressed
checkpoint.  A job is built from the command's parameters and answers, in the runner's order,
``check()`` (every refusal before any work), ``load()``, ``compress(update)`` (``update``: the
progress bar's, see :func:`quantkit.cli.common.progress_task`), ``save(result)`` and
``payload(result)`` (the ``--json`` fields but ``seconds`` and ``peak_rss_bytes``), and says how
the result is shown (``label``, ``total``, ``title``, ``keys``, ``last``, ``fmt``, ``skip_note``,
``notes(result)``).  Heavy imports stay inside the methods: the CLI imports no torch.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import click

from quantkit.cli.common import check_output, check_positive, err_console, four_decimals
from quantkit.cli.options import given, method_options
from quantkit.errors import QuantkitError


class Job:
    """What a job shows unless it says otherwise: no notes, every field, plain values."""

    total = None  # the progress bar's length (None: the job sets it as it goes)
    keys = None  # rows of the table (None: every field)
    last: tuple = ()  # fields reported after seconds and peak_rss_bytes
    fmt = staticmethod(lambda k, v: str(v))
    skip_note = staticmethod(lambda note: False)

    def notes(self, res):
        return ()


@dataclasses.dataclass(frozen=True)
class Kind:
    """What tells quantize, prune and lowrank apart (everything else is :class:`MethodJob`)."""

    name: str  # the registry kind of its methods, whose config fields are its method options
    default: str  # its --method default
    noun: str | None  # "pruning": other kinds' methods are refused as "not a pruning method"; None: any method
    fields: Callable  # (job, result) -> the --json fields between "method" and "bytes_before"
    check: Callable[[str, dict], None] = lambda method, options: None  # refusals before the config is built
    keys: tuple | None = None  # rows of the table (None: every field)
    last: tuple = ()  # fields reported after seconds and peak_rss_bytes
    fmt: Callable = lambda k, v: str(v)
    skip_note: Callable = lambda note: False
    extra_config: Callable = lambda res: None  # more of the checkpoint's quantization_config
    pack: bool = False  # pack each block as soon as it is done (see api.compress)


class MethodJob(Job):
    """quantize, prune or lowrank: one registered method on one model, from the command's options
    (only those the user gave reach the method's config)."""

    def __init__(self, kind: Kind, ctx: click.Context):
        from quantkit.data import CalibSpec

        p = ctx.params
        self.kind, self.model, self.method, self.output = kind, p["model"], p["method"], p["output"]
        self.overwrite, self.as_json = p["overwrite"], p["as_json"]
        self.label, self.title = self.method, f"quantkit {kind.name} --method {self.method}"
        self.keys, self.last, self.fmt, self.skip_note = kind.keys, kind.last, kind.fmt, kind.skip_note
        self.dtype, self.allow_pickle, self.trust_remote_code = p["dtype"], p["allow_pickle"], p["trust_remote_code"]
        self.calib = CalibSpec(**{f.name: p[f.name] for f in dataclasses.fields(CalibSpec)})
        self.options = given(ctx, [o.name for o in method_options(kind.name, kind.default)])
        self.stream, self.resume, self.offload = p.get("stream", False), p.get("resume", False), p.get("offload")
        self.device = p.get("device", "auto")

    def check(self) -> None:
        from quantkit import api
        from quantkit.data import check_calibration_size
        from quantkit.api import method_names
        from quantkit.devices import resolve_device

        self.method_cls = api.get_method(self.method)
        self.device = resolve_device(self.device)
        if self.kind.noun and getattr(self.method_cls, "kind", "quantize") != self.kind.name:
            raise QuantkitError(f"{self.method!r} is not a {self.kind.noun} method; {self.kind.noun} methods: "
                                f"{', '.join(method_names(self.kind.name))}")
        self.kind.check(self.method, self.options)
        self.config = api.make_config(self.method, self.options)
        check_positive("--nsamples", self.calib.nsamples, 1_000_000)
        check_positive("--seqlen", self.calib.seqlen, 1_048_576)
        check_positive("--batch-size", self.calib.batch_size)
        if self.method_cls.calibrates(self.config):
            check_calibration_size(self.calib.nsamples, self.calib.seqlen)
        check_output(self.output, self.overwrite, inputs=(self.model, self.calib.dataset, self.offload))
        self._choose_streaming()
        if self.stream and getattr(self.config, "rotate", False):
            raise QuantkitError("the rotation needs the whole model in memory: give --no-stream (and drop --resume)")
        if self.stream and getattr(self.config, "target_bpw", None) is not None:
            raise QuantkitError("--target-bpw measures every linear on the whole model first: give --no-stream (and drop --resume)")

    def _choose_streaming(self) -> None:
        from quantkit.models.skeleton import should_stream

        if self.resume and self.stream is False:
            raise QuantkitError("--resume continues a --stream run; drop --no-stream")
        if self.stream is None:
            self.stream = self.resume or should_stream(self.model, self.dtype)
            if self.stream and not self.resume:
                err_console.print(f"[yellow]note[/] {self.model}'s weights exceed half the available memory: streaming them "
                                  "block by block (--no-stream loads the model whole)")

    def load(self) -> None:
        """The model (or, streaming, its source on disk) and the calibration windows.  The
        calibration text is tokenized before the model is loaded: tokenizing a long text briefly
        takes several times its ids, and doing it first keeps that off the model's peak memory."""
        from quantkit import api
        from quantkit.data import calibration_samples, check_context
        from quantkit.memory import return_large_frees_to_os
        from quantkit.models.load import load_tokenizer, model_bytes
        from quantkit.models.skeleton import StreamSource

        calibrated = self.method_cls.calibrates(self.config)
        if self.stream:
            self.source = StreamSource.open(self.model, self.dtype, self.trust_remote_code)
            self.bytes_before = self.source.nbytes()
            if calibrated:
                check_context(self.calib.seqlen, self.source.model.config)
            return
        return_large_frees_to_os()  # before the first large allocation: see quantkit.memory
        load = dict(dtype=self.dtype, allow_pickle=self.allow_pickle, trust_remote_code=self.trust_remote_code)
        self.calib_ids = None
        if calibrated:
            self.tok = load_tokenizer(self.model, self.trust_remote_code)
            c = self.calib
            self.calib_ids = calibration_samples(self.tok, c.dataset, c.nsamples, c.seqlen, c.seed)
            self.m, _ = api.load_model(self.model, with_tokenizer=False, **load)
            check_context(c.seqlen, self.m.config)
        else:
            self.m, self.tok = api.load_model(self.model, **load)
        self.bytes_before = model_bytes(self.m)

    def compress(self, update):
        from quantkit import api
        from quantkit.calibrate.offload import OffloadHooks

        c = self.calib
        if self.stream:  # writes OUTPUT too
            return api.compress_streaming(
                self.model, self.output, self.method, self.config, calib=c.dataset, nsamples=c.nsamples, seqlen=c.seqlen,
                seed=c.seed, batch_size=c.batch_size, resume=self.resume, overwrite=self.overwrite,
                offload_dir=self.offload, trust_remote_code=self.trust_remote_code, source=self.source, progress=update,
                device=self.device)
        hooks = OffloadHooks(self.offload) if self.offload else None
        try:
            return api.compress(self.m, self.method, self.config, calib_ids=self.calib_ids, batch_size=c.batch_size,
                                hooks=hooks, pack=self.kind.pack, progress=update, device=self.device)
        finally:
            if hooks is not None:
                hooks.cleanup()

    def save(self, res) -> None:
        from quantkit import api

        if not self.stream:
            api.save(self.m, self.tok, self.output, self.method, res, overwrite=self.overwrite,
                     extra_config=self.kind.extra_config(res), inputs=(self.model,))

    def payload(self, res) -> dict:
        from quantkit.models.load import dir_bytes

        return {"output": os.path.abspath(self.output), "method": self.method, **self.kind.fields(self, res),
                "bytes_before": self.bytes_before, "bytes_after": dir_bytes(self.output)}

    def notes(self, res):
        return res.log


class RecipeJob(Job):
    """``quantkit run``: the steps of a YAML recipe, validated before the model is loaded."""

    label = "recipe"

    def __init__(self, p: dict):
        self.recipe, self.model, self.output, self.sets = p["recipe"], p["model"], p["output"], tuple(p["sets"])
        self.overwrite, self.as_json = p["overwrite"], p["as_json"]
        self.load_kw = {k: p[k] for k in ("dtype", "allow_pickle", "trust_remote_code")}
        self.title = f"quantkit run {os.path.basename(self.recipe)}"
        self.device = p["device"]

    def check(self) -> None:
        from quantkit.devices import resolve_device
        from quantkit.recipe import load_recipe

        self.device = resolve_device(self.device)
        self.rec = load_recipe(self.recipe, self.sets)
        check_output(self.output, self.overwrite, inputs=(self.model, self.recipe, self.rec.calibration.get("dataset")))

    def load(self) -> None:
        from quantkit import api
        from quantkit.models.load import model_bytes

        self.m, self.tok = api.load_model(self.model, **self.load_kw)
        self.bytes_before = model_bytes(self.m)

    def compress(self, update):
        from quantkit.recipe import run_recipe

        steps = self.rec.steps
        return run_recipe(self.rec, self.m, self.tok, progress=lambda i, a, b, info: update(
            a, b, info, f"step {i + 1}/{len(steps)} {steps[i].method}"), device=self.device)

    def save(self, res) -> None:
        from quantkit import api

        name = "+".join(s.method for s in self.rec.steps)
        api.save(self.m, self.tok, self.output, name, res, overwrite=self.overwrite, extra_config={"recipe": self.rec.source},
                 inputs=(self.model,))

    def payload(self, res) -> dict:
        from quantkit.models.load import dir_bytes

        from quantkit.runtime.qlinear import bits_per_weight

        return {"output": os.path.abspath(self.output), "recipe": os.path.abspath(self.recipe),
                "steps": [s.method for s in self.rec.steps], "bytes_before": self.bytes_before,
                "bytes_after": dir_bytes(self.output), "bits_per_weight": bits_per_weight(self.m),
                "modules": len(res.quantized)}

    last = ("modules",)


class DistillJob(Job):
    """``quantkit distill``: knowledge distillation of a student from a teacher, on the CPU."""

    label, title = "distill", "quantkit distill"
    keys = ("output", "student_format", "steps", "batch_size", "seqlen", "tokens", "lr", "temperature", "hidden_mse",
            "trainable_params", "masked_weights", "kd_first", "kd_last", "heldout_kd_before", "heldout_kd_after",
            "seconds", "peak_rss_bytes")
    fmt = staticmethod(four_decimals("kd", "heldout"))

    def __init__(self, p: dict):
        self.p, self.as_json, self.total = p, p["as_json"], p["steps"]

    def check(self) -> None:
        from quantkit import distill as kd
        from quantkit.models.paths import read_quantization_config

        p = self.p
        self.cfg = kd.DistillConfig(**{f.name: p[f.name] for f in dataclasses.fields(kd.DistillConfig)})
        check_output(p["output"], p["overwrite"], inputs=(p["teacher"], p["student"], self.cfg.data))
        student = p["student"]
        self.qcfg = read_quantization_config(student) if Path(student).is_dir() else None
        if self.qcfg is not None and self.qcfg.get("quant_method") != "quantkit":
            raise QuantkitError(f"{student} is quantized by {self.qcfg.get('quant_method')!r}, not quantkit: cannot keep its format")
        kd.check_student_kinds(self.qcfg)

    def load(self) -> None:
        """Teacher (float32) and student (trained in float32, saved in its own dtype), checked as a
        pair, and the training and held-out windows."""
        import torch

        from quantkit import distill as kd
        from quantkit.data import calibration_samples, check_context
        from quantkit.checkpoint.formats import load_model

        p = self.p
        load = dict(allow_pickle=p["allow_pickle"], trust_remote_code=p["trust_remote_code"])
        self.teacher, t_tok = load_model(p["teacher"], dtype="float32", **load)
        self.student, self.tok = load_model(p["student"], **load)
        self.dtype = next(q.dtype for q in self.student.parameters() if q.dtype.is_floating_point)
        if self.qcfg is None and self.dtype != torch.float32:
            self.student.float()
        kd.check_tokenizers(t_tok, self.tok)
        kd.check_pair(self.teacher, self.student, self.cfg.hidden_mse)
        cfg = self.cfg
        check_context(cfg.seqlen, self.teacher.config, self.student.config, whose="models'")
        self.ids = calibration_samples(self.tok, cfg.data, cfg.steps * cfg.batch_size, cfg.seqlen, cfg.seed)
        self.heldout = calibration_samples(self.tok, cfg.data, 4, cfg.seqlen, cfg.seed + 1)

    def compress(self, update):
        from quantkit import distill as kd

        p = self.p
        return kd.distill(self.teacher, self.student, self.ids, self.cfg, heldout=self.heldout,
                          progress=lambda i, n, loss: update(i, info=f"kd {loss:.4f}"))

    def save(self, rep) -> None:
        from quantkit import distill as kd

        kd.save_student(self.student, self.tok, self.p["output"], self.qcfg, overwrite=self.p["overwrite"], dtype=self.dtype)

    def payload(self, rep) -> dict:
        p = self.p
        return {"output": os.path.abspath(p["output"]), "teacher": p["teacher"], "student": p["student"],
                "student_format": "quantkit packed" if self.qcfg else "float",
                **{k: v for k, v in rep.items() if k not in ("losses", "kd_losses")}}
