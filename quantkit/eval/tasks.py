"""Task accuracy through lm-evaluation-harness, scored by quantkit's own runtime.

:class:`QuantkitLM` is a harness ``LM`` over a model quantkit loaded (float, packed, imported), so a
packed checkpoint is scored with its own kernels.  Tasks are harness task names (online: the
harness downloads their data) or local task files: the harness's YAML with ``dataset_path: json``
and ``data_files`` beside the YAML (resolved here, so a task folder can move).  quantkit ships one
offline multiple-choice task, ``tinystories_mc`` (quantkit/data/files/tasks).  The harness is an
optional dependency: ``pip install 'quantkit[tasks]'``.

    >>> scores = run_tasks(model, tok, ["tinystories_mc"])   # {"tinystories_mc": {"acc": 0.59, ...}}  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from quantkit.errors import QuantkitError

TASK_DIR = Path(__file__).resolve().parents[1] / "data" / "files" / "tasks"


def require_harness() -> None:
    """A one-line error, before any work, where lm-evaluation-harness is not installed."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise QuantkitError("task scores need lm-evaluation-harness: pip install 'quantkit[tasks]'")


def _harness():
    require_harness()
    from lm_eval.api.model import LM

    return LM


def local_task(name_or_path: str) -> dict | None:
    """A local task's config (a shipped name or a ``.yaml`` path) with its ``data_files`` made
    absolute, or None for a harness task name."""
    import yaml

    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = TASK_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            return None
    if not path.is_file():
        raise QuantkitError(f"task file {name_or_path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise QuantkitError(f"{path}: not a YAML task: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict) or "task" not in cfg:
        raise QuantkitError(f"{path}: a task file needs a 'task' name (lm-evaluation-harness YAML)")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        cfg["dataset_kwargs"]["data_files"] = {k: str((path.parent / v).resolve()) for k, v in files.items()}
        missing = [v for v in cfg["dataset_kwargs"]["data_files"].values() if not Path(v).is_file()]
        if missing:
            raise QuantkitError(f"{path}: data file {missing[0]} does not exist")
    return cfg


def make_lm(model, tokenizer, max_length: int | None = None):
    """A harness ``LM`` backed by ``model`` (log-likelihoods of continuations; greedy generation)."""
    LM = _harness()

    class QuantkitLM(LM):
        def __init__(self):
            super().__init__()
            self.model, self.tok = model, tokenizer
            self.max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
            self._device = model.get_input_embeddings().weight.device

        def _encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            spaces = len(context) - len(context.rstrip())  # as the harness's HF model: trailing spaces join the continuation
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = self.tok(context + continuation).input_ids
            ctx = self.tok(context).input_ids if context else whole[:1]
            return ctx, whole[len(ctx):]

        @torch.no_grad()
        def _loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
            ctx, cont = self._encode(context, continuation)
            ids = (ctx + cont)[-(self.max_length + 1):]
            x = torch.tensor([ids[:-1]], device=self._device)
            logp = F.log_softmax(self.model(input_ids=x).logits[0, -len(cont):].float(), -1)
            target = torch.tensor(cont, device=self._device)
            return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())

        def loglikelihood(self, requests):
            return [self._loglikelihood(*r.args) for r in requests]

        def loglikelihood_rolling(self, requests):
            return [self._loglikelihood("", r.args[0])[0] for r in requests]

        def generate_until(self, requests):
            from quantkit.runtime.generate import SamplingParams, encode_prompt, generate

            out = []
            for r in requests:
                context, kwargs = r.args
                until = kwargs.get("until") or []
                params = SamplingParams(max_new_tokens=int(kwargs.get("max_gen_toks", 256)), temperature=0.0,
                                        stop=tuple([until] if isinstance(until, str) else until))
                out.append(generate(self.model, self.tok, encode_prompt(self.tok, context), params).text)
            return out

    return QuantkitLM()


def run_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, num_fewshot: int | None = None) -> dict:
    """``{task: {metric: value}}`` (stderr keys dropped) for harness task names and local tasks."""
    from lm_eval import simple_evaluate

    lm = make_lm(model, tokenizer)
    specs = [local_task(t) or t for t in tasks]
    try:
        res = simple_evaluate(model=lm, tasks=specs, limit=limit, num_fewshot=num_fewshot, log_samples=False)
    except (KeyError, ValueError) as e:  # an unknown task name, a task needing data offline
        raise QuantkitError(f"lm-evaluation-harness could not run {', '.join(tasks)}: {str(e).splitlines()[0][:200]}") from None
    out = {}
    for task, metrics in res["results"].items():
        out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                     if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    return out
