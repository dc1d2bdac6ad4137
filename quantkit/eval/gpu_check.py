"""The GPU check (issue 20): quantkit's CUDA half measured in one prepared run of a few minutes.

    python -m quantkit.eval.gpu_check                 # on a CUDA machine, from a checkout: eval/RESULTS-gpu.md/.json
    TRITON_INTERPRET=1 python -m quantkit.eval.gpu_check --tiny --out D
                        # the same steps at toy sizes on the CPU (the kernels in Triton's interpreter),
                        # a rehearsal; its figures are never written to eval/

The GPU machine has no network: eval/gpu_bundle.sh gathers the wheels it lacks and prints the one
command that installs them there and runs this.  (The issue names it eval/gpu_check.py; the
repository's top-level eval/ holds results and no Python, so that nothing there can shadow an import.)

a. every Triton kernel (W4A16 split-K and GEMM, W8A16, W8A8) against its torch reference on
   Llama-3-8B's linear shapes, M = 1, 8, 32, 128, 2048, groups 128 and 64, bf16 and fp16;
b. W4A16 g128 against cuBLAS bf16 ``F.linear`` at M = 1, 8, 32 (weights rotated over more than
   the L2 cache), achieved GB/s against a device-to-device copy measured in the same run;
c. decode tokens/s at batch 1, 8 and 32 of a random-weight Llama-3-8B-shaped model built on the
   GPU: bf16, int4 (RTN W4 g128) and int8 (W8 per channel) through quantkit's lean forward with
   the step replayed from a CUDA graph (batch 1 also without it), with the roofline fraction
   (weight bytes per step x steps/s / copy bandwidth);
d. GPTQ W4 g128 wall time for one 8B-shaped block, 128 x 2048 calibration tokens, the model in
   CPU memory and the block on the GPU (``api.compress(..., device="cuda")``);
e. stories260K quantized on the GPU and on the CPU, each evaluated on both: perplexities within 0.5%.

Every figure is measured by this run on the machine it names; nothing is carried over.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from quantkit.eval.gpu_report import TARGETS, device_name, markdown, summarize  # noqa: F401  (TARGETS re-exported)

ROOT = Path(__file__).resolve().parents[2]
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
# Correctness of the other dtypes and groups with one fixed configuration each (autotuning every one
# of them would compile ~130 variants, minutes of the device's time); bf16 g128 runs autotuned.
FIXED = {"gemm": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8), "splitk": dict(BLOCK_N=64, BLOCK_K=64, SPLIT_K=4),
         "w8a8": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)}
TOL = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2}  # relative Frobenius error against the float32 reference


@dataclass
class Plan:
    shapes: dict  # name -> (K, N)
    ms: tuple
    bench_ms: tuple
    groups: tuple
    dtypes: tuple
    model: dict
    batches: tuple
    prompt: int
    new_tokens: int
    calib: tuple  # (nsamples, seqlen) for the GPTQ block
    rotate_bytes: int  # weights cycled in the micro-benchmarks, more than the L2 cache


def make_plan(tiny: bool) -> Plan:
    if tiny:
        return Plan({"square 64x96": (64, 96), "tall 128x64": (128, 64)}, (1, 20), (1, 8), (32,),
                    (torch.float16, torch.bfloat16), TINY_LLAMA, (1, 2), 8, 4, (4, 64), 1 << 20)
    return Plan({"q/o 4096x4096": (4096, 4096), "gate/up 4096x14336": (4096, 14336),
                 "down 14336x4096": (14336, 4096), "head 4096x128256": (4096, 128256)},
                (1, 8, 32, 128, 2048), (1, 8, 32), (128, 64), (torch.bfloat16, torch.float16),
                LLAMA3_8B, (1, 8, 32), 128, 64, (128, 2048), 512 << 20)


# ---- timing ---------------------------------------------------------------------------------
def bench_ms(fn, device: torch.device) -> float:
    """Median milliseconds of ``fn()``: CUDA events through ``triton.testing.do_bench`` on a GPU,
    the host clock elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy, bytes read plus written per second."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    b = torch.empty_like(a)
    return 2 * nbytes / (bench_ms(lambda: b.copy_(a), device) / 1e3)


# ---- a. kernels against their references ------------------------------------------------------
def random_weight(k: int, n: int, group: int, bits: int, sym: bool, device, seed: int = 0):
    """Random codes ``[n, k]``, float16 scales (as checkpoints store them) and zeros, drawn where they are used."""
    g = torch.Generator(device=device).manual_seed(seed)
    groups = k // group if group > 0 else 1
    q = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.uint8, device=device)
    scales = (torch.rand(n, groups, generator=g, device=device) * 0.01 + 0.001).half()
    zeros = None if sym else torch.randint(0, 2 ** bits, (n, groups), generator=g, device=device).float()
    return q, scales, zeros


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def check_kernels(plan: Plan, device: torch.device) -> list[dict]:
    from quantkit.kernels import int8_matmul, int8_matmul_ref, w4a16_matmul_ref, w8a16_matmul_ref
    from quantkit.kernels.layout import int4_weight_from_codes, int8_weight_from_codes
    from quantkit.kernels.w4a16 import DECODE_MAX_M, w4a16_matmul
    from quantkit.kernels.w8a16 import w8a16_matmul

    rows = []
    for (name, (k, n)), group in itertools.product(plan.shapes.items(), plan.groups):
        q4, s4, z4 = random_weight(k, n, group, 4, group == plan.groups[0], device)  # the tuned group size symmetric, as b, c run it
        w4 = int4_weight_from_codes(q4, s4, z4, None, group)
        q8, s8, z8 = random_weight(k, n, group, 8, True, device, seed=1)
        w8 = int8_weight_from_codes(q8, s8, None, None, group)
        for m, dtype in itertools.product(plan.ms, plan.dtypes):
            x = torch.randn(m, k, device=device).to(dtype)
            tuned = dtype == plan.dtypes[0] and group == plan.groups[0]  # what parts b and c run: autotuned
            for kernel, fn, ref in (("w4a16", w4a16_matmul, w4a16_matmul_ref), ("w8a16", w8a16_matmul, w8a16_matmul_ref)):
                w = w4 if kernel == "w4a16" else w8
                config = None if tuned else FIXED["splitk" if kernel == "w4a16" and m <= DECODE_MAX_M else "gemm"]
                err = rel_err(fn(x, w, config=config), ref(x, w))
                rows.append(dict(kernel=kernel, shape=name, m=m, group=group, dtype=str(dtype)[6:], autotuned=tuned,
                                 rel_err=err, ok=err <= TOL[dtype]))
            del x
        del w4, w8, q4, q8
        if group != plan.groups[0]:
            continue
        wi = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
        ws = torch.rand(n, device=device) * 0.01
        for m, dtype in itertools.product(plan.ms, plan.dtypes):
            xi = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
            xs = torch.rand(m, 1, device=device) * 0.1
            tuned = dtype == plan.dtypes[0]
            if device.type == "cuda" or _interpreting():
                from quantkit.kernels.w8a8 import w8a8_matmul

                y = w8a8_matmul(xi, wi, xs, ws.view(1, -1), dtype, None, config=None if tuned else FIXED["w8a8"])
            else:
                y = int8_matmul(xi, wi, xs, ws.view(1, -1), dtype, backend="reference")
            err = rel_err(y, int8_matmul_ref(xi, wi, xs, ws.view(1, -1), torch.float32))
            rows.append(dict(kernel="w8a8", shape=name, m=m, group=-1, dtype=str(dtype)[6:], autotuned=tuned, rel_err=err,
                             ok=err <= TOL[dtype]))
    return rows


def _interpreting() -> bool:
    from quantkit.kernels.triton_utils import interpreting

    return interpreting()


# ---- b. W4A16 against cuBLAS --------------------------------------------------------------------
def bench_w4a16(plan: Plan, device: torch.device, bandwidth: float) -> list[dict]:
    from quantkit.kernels.layout import int4_weight_from_codes
    from quantkit.kernels.w4a16 import w4a16_matmul

    rows = []
    group = plan.groups[0]
    for name, (k, n) in plan.shapes.items():
        copies = max(2, -(-plan.rotate_bytes // (k * n // 2)))  # int4 copies that overflow the L2 cache
        q, s, _ = random_weight(k, n, group, 4, True, device)
        w4 = [int4_weight_from_codes(q, s.clone(), None, None, group) for _ in range(copies)]
        dense = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
                 for _ in range(max(2, -(-plan.rotate_bytes // (2 * k * n))))]
        for m in plan.bench_ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            i4, ib = itertools.cycle(w4), itertools.cycle(dense)
            t_q = bench_ms(lambda: w4a16_matmul(x, next(i4)), device)
            t_d = bench_ms(lambda: F.linear(x, next(ib)), device)
            nbytes = w4[0].nbytes() + 2 * m * (k + n)
            rows.append(dict(shape=name, m=m, w4a16_us=t_q * 1e3, bf16_us=t_d * 1e3, speedup=t_d / t_q,
                             gb_per_s=nbytes / (t_q / 1e3) / 1e9, bandwidth_fraction=nbytes / (t_q / 1e3) / bandwidth))
        del w4, dense
    return rows


# ---- c. decode ------------------------------------------------------------------------------------
def random_llama(shape: dict, device: torch.device, dtype: torch.dtype, layers: int | None = None):
    """A random-weight Llama of ``shape`` built where it runs (nothing loaded)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{**shape, **({"num_hidden_layers": layers} if layers else {})})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()  # built in dtype: no float32 copy
    return model


def quantize_random(model, fmt: str, device: torch.device):
    """RTN int4 (g128) or int8 (per channel) packed runtime modules on every block linear."""
    from quantkit import api

    opts = {"bits": 4, "group_size": 128 if model.config.hidden_size % 128 == 0 else 32} if fmt == "int4" else \
        {"bits": 8, "group_size": -1}
    api.compress(model, "rtn", opts, pack=True, device=device)
    return model


def decode_rates(model, plan: Plan, device: torch.device, bandwidth: float, fmt: str) -> list[dict]:
    from quantkit.eval.speed import decode_bytes_per_token
    from quantkit.runtime.cudagraph import decode_stepper
    from quantkit.runtime.lean import LeanLM

    rows = []
    for batch, graphs in [(b, True) for b in plan.batches] + [(1, False)]:
        if not graphs and device.type != "cuda":
            continue
        lm = LeanLM(model, max_len=plan.prompt + plan.new_tokens + 4, batch=batch)
        step = decode_stepper(lm, graphs=graphs)
        ids = torch.randint(0, model.config.vocab_size, (batch, plan.prompt), device=device)
        with torch.inference_mode():
            nxt = step(ids).argmax(-1, keepdim=True)
            nxt = step(nxt).argmax(-1, keepdim=True)  # the graph's capture happens here
            sync(device)
            t0 = time.perf_counter()
            for _ in range(plan.new_tokens):
                nxt = step(nxt).argmax(-1, keepdim=True)
            sync(device)
        seconds = time.perf_counter() - t0
        steps_per_s = plan.new_tokens / seconds
        per_step = decode_bytes_per_token(model)
        rows.append(dict(format=fmt, batch=batch, cuda_graph=graphs and device.type == "cuda",
                         tokens_per_s=batch * steps_per_s, weight_bytes_per_step=per_step,
                         roofline_fraction=per_step * steps_per_s / bandwidth))
        del lm, step
    return rows


def bench_decode(plan: Plan, device: torch.device, bandwidth: float) -> list[dict]:
    dtype = torch.bfloat16
    rows = []
    for fmt in ("bf16", "int4", "int8"):
        model = random_llama(plan.model, device, dtype)
        if fmt != "bf16":
            quantize_random(model, fmt, device)
        rows += decode_rates(model, plan, device, bandwidth, fmt)
        del model
        gc.collect()  # a captured graph and its LeanLM refer to each other
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---- d. GPTQ on one block ---------------------------------------------------------------------------
def gptq_block(plan: Plan, device: torch.device) -> dict:
    """One 8B-shaped block (embeddings and head too: the driver needs them) in CPU memory in bf16;
    GPTQ W4 g128 with the block on ``device``."""
    from quantkit import api

    model = random_llama(plan.model, torch.device("cpu"), torch.bfloat16, layers=1)
    nsamples, seqlen = plan.calib
    ids = torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    group = 128 if model.config.hidden_size % 128 == 0 else 32
    t0 = time.perf_counter()
    res = api.compress(model, "gptq", {"bits": 4, "group_size": group}, calib_ids=ids, batch_size=8, device=device)
    seconds = time.perf_counter() - t0
    return dict(block_seconds=seconds, linears=len(res.quantized), tokens=nsamples * seqlen, group_size=group)


# ---- e. stories260K, GPU against CPU ---------------------------------------------------------------
def stories_agreement(device: torch.device, workdir: Path) -> dict:
    from quantkit import api
    from quantkit.checkpoint.formats import load_model
    from quantkit.data import calibration_samples, eval_windows, load_text, tokenize
    from quantkit.eval.perplexity import perplexity

    stories, text = ROOT / "tests/fixtures/stories260K", str(ROOT / "tests/fixtures/tinystories.txt")
    if not stories.is_dir():
        return dict(skipped=f"{stories} is missing: run from a checkout", ok=None)
    out = {}
    for where in ("cpu", device.type):
        if where in out:
            continue
        model, tok = load_model(str(stories))
        ids = calibration_samples(tok, text, nsamples=16, seqlen=128, seed=0)
        res = api.compress(model, "gptq", {"bits": 4, "group_size": -1}, calib_ids=ids, device=where)
        path = api.save(model, tok, workdir / f"stories-gptq-{where}", "gptq", res, overwrite=True)
        windows = eval_windows(tokenize(tok, load_text(text)), 256, max_windows=12)
        for run_on in ("cpu", device.type):
            m, _ = load_model(str(path), device=run_on)
            out.setdefault(where, {})[run_on] = perplexity(m, windows)["perplexity"]
    values = [v for d in out.values() for v in d.values()]
    spread = (max(values) - min(values)) / min(values)
    return dict(perplexity={f"quantized on {q}, run on {r}": v for q, d in out.items() for r, v in d.items()},
                max_relative_spread=spread, ok=spread <= 0.005)


# ---- the run ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="Toy sizes on the CPU (with TRITON_INTERPRET=1): a rehearsal.")
    ap.add_argument("--parts", default="abcde", help="Which parts to run (default: all).")
    ap.add_argument("--out", default=None, help="Folder for RESULTS-gpu.md/.json (default: eval/ on a GPU; required with --tiny).")
    args = ap.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() and not args.tiny else torch.device("cpu")
    if device.type != "cuda" and not args.tiny:
        print("gpu_check: no CUDA device; rehearse with --tiny --out DIR (TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    if args.tiny and not args.out:
        print("gpu_check: --tiny needs --out (its figures are not GPU figures)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else ROOT / "eval"
    out.mkdir(parents=True, exist_ok=True)
    plan = make_plan(args.tiny)
    t0 = time.perf_counter()
    r: dict = {"device": device_name(device), "mode": "tiny rehearsal" if args.tiny else "full"}
    r["copy_bandwidth_gb_s"] = copy_bandwidth(device, plan.rotate_bytes * 4) / 1e9
    steps = {"a": ("kernels", lambda: check_kernels(plan, device)),
             "b": ("w4a16_vs_bf16", lambda: bench_w4a16(plan, device, r["copy_bandwidth_gb_s"] * 1e9)),
             "c": ("decode", lambda: bench_decode(plan, device, r["copy_bandwidth_gb_s"] * 1e9)),
             "d": ("gptq_block", lambda: gptq_block(plan, device)),
             "e": ("stories", lambda: stories_agreement(device, out))}
    for part in args.parts:
        key, run = steps[part]
        t1 = time.perf_counter()
        r[key] = run()
        print(f"[{part}] {key}: {time.perf_counter() - t1:.1f} s", flush=True)
        r["seconds"] = time.perf_counter() - t0
        r["targets"] = summarize(r)
        (out / "RESULTS-gpu.json").write_text(json.dumps(r, indent=1, default=str))  # kept if a later part fails
    (out / "RESULTS-gpu.md").write_text("# GPU check (issue 20)\n\n" + markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
