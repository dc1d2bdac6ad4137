"""Peak memory of ``quantkit quantize --stream`` on a random-weight model larger than the memory cap.

    python -m quantkit.eval.bench_memory                 # Llama-3.2-3B shape, bf16 shards (~6.4 GB under /tmp)
    python -m quantkit.eval.bench_memory --small         # a ~100M-parameter Llama, for a quick check
    python -m quantkit.eval.bench_memory --methods rtn,gptq --nsamples 16 --seqlen 256   # gptq: its first 2 blocks

1. A random Llama checkpoint is written shard by shard (one tensor in memory at a time) in
   bf16 safetensors with a ``model.safetensors.index.json`` and a byte-level tokenizer; it is
   kept in ``--workdir`` and reused by later runs.
2. Each method runs as ``quantkit quantize MODEL -o OUT --stream`` in a subprocess under a memory
   cap of ``--cap`` x the model's bytes (default 0.5) plus ``--cap-extra-gb`` (default: 0 for the
   3B shape; 1.5 for ``--small``, whose 0.25 GB model is smaller than the ~1 GB an interpreter maps
   just by importing torch and transformers); a run that needs more fails instead of swapping.
   ``--limit as`` (default) sets ``RLIMIT_AS``, the virtual size: stricter than the resident set,
   since shared libraries, thread stacks and allocator reservations count (quantkit reads
   safetensors with plain reads, not mmap, so at least the shards never do).  That is workable
   for RTN but not for GPTQ at 0.5x: on the 3B shape its virtual size peaks at ~3.4 GB while its
   resident set peaks at ~2.7 GB.  ``--limit data`` sets ``RLIMIT_DATA`` (heap and private
   writable mappings, what allocations actually use); ``--limit rss`` is a watchdog that kills
   the run when its resident set passes the cap (polled every 50 ms).
3. Peak RSS is the child's ``ru_maxrss`` (``os.wait4``), cross-checked with ``VmHWM`` polled from
   ``/proc``; the baseline is the peak RSS of a process that only imports torch, transformers and
   quantkit.  The table states peak RSS against the model's bytes (goal: at most 0.5x).

On a shared CPU set ``OMP_NUM_THREADS=1`` (the children inherit it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from quantkit.testing import cli_killed_after_block

SHAPES = {
    # Llama-3.2-3B: 3.21B parameters, tied embeddings
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    # ~100M parameters, untied head
    "small": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, head_dim=64, tie_word_embeddings=False),
}



def llama_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, dtype="bfloat16", **SHAPES[shape])


def _tensor_shapes(cfg) -> list[tuple[str, tuple[int, ...]]]:
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    out = [("model.embed_tokens.weight", (cfg.vocab_size, h))]
    for b in range(cfg.num_hidden_layers):
        p = f"model.layers.{b}."
        out += [(p + "self_attn.q_proj.weight", (cfg.num_attention_heads * cfg.head_dim, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, cfg.num_attention_heads * cfg.head_dim)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)), (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", (cfg.vocab_size, h)))
    return out


def _random(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A seeded tensor per name: norms are ones, matrices N(0, 0.02) in bf16 (one at a time in memory)."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def _bpe_tokenizer():
    """A byte-level BPE tokenizer (4096 tokens) trained on the shipped C4 calibration sample, so
    calibration tokenizes about as densely as with a real vocabulary."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    from quantkit.data import load_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = load_text("c4", "validation")
    tok.train_from_iterator((text[i:i + 10000] for i in range(0, len(text), 10000)),
                            trainers.BpeTrainer(vocab_size=4096, initial_alphabet=ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def write_random_checkpoint(directory: Path, shape: str, shard_bytes: int = 5 * 2**30) -> int:
    """Write the model shard by shard; returns the weights' bytes.  Reuses a complete earlier write."""
    from quantkit.models.safetensors import write_safetensors

    cfg = llama_config(shape)
    done = directory / "DONE"
    if done.is_file() and done.read_text() == shape:
        return json.loads((directory / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    shards, current, size = [], [], 0
    for name, shp in _tensor_shapes(cfg):
        nbytes = 2 * int(torch.Size(shp).numel())
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shp))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = [(n, torch.bfloat16, shp, lambda n=n, shp=shp: _random(n, shp)) for n, shp in shard]
        write_safetensors(directory / fname, entries, {"format": "pt"})
        for n, shp in shard:
            weight_map[n] = fname
            total += 2 * int(torch.Size(shp).numel())
        print(f"  wrote {fname} ({(directory / fname).stat().st_size / 1e9:.2f} GB)", file=sys.stderr)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                                       indent=1))
    cfg.save_pretrained(directory)
    _bpe_tokenizer().save_pretrained(directory)
    done.write_text(shape)
    return total


LIMITS = {"as": resource.RLIMIT_AS, "data": resource.RLIMIT_DATA}
LIMIT_NAMES = {"as": "RLIMIT_AS", "data": "RLIMIT_DATA", "rss": "an RSS watchdog at"}


def run_capped(cmd: list[str], cap_bytes: int | None, env: dict | None = None, limit_kind: str = "as") -> dict:
    """Run ``cmd`` under a memory cap: ``as`` (RLIMIT_AS, virtual size), ``data`` (RLIMIT_DATA:
    heap and private writable mappings) or ``rss`` (a watchdog SIGKILLs it when its resident set
    passes the cap; polled every 50 ms).  Its peak RSS comes from wait4, cross-checked by polling /proc."""
    def limit():
        if cap_bytes and limit_kind in LIMITS:
            resource.setrlimit(LIMITS[limit_kind], (cap_bytes, cap_bytes))

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit, text=True, env=env)
    hwm, vsz, over, finished = [0], [0], [False], threading.Event()

    def poll():  # never waits on the child: wait4 below reaps it with its rusage
        status = Path(f"/proc/{p.pid}/status")
        while not finished.is_set():
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        hwm[0] = max(hwm[0], int(line.split()[1]) * 1024)
                    elif line.startswith("VmPeak:"):
                        vsz[0] = max(vsz[0], int(line.split()[1]) * 1024)
                    elif line.startswith("VmRSS:") and limit_kind == "rss" and cap_bytes and int(line.split()[1]) * 1024 > cap_bytes:
                        over[0] = True
                        os.kill(p.pid, 9)
            except (OSError, ValueError):
                finished.wait(0.05)  # the child exited between the poll and the read; the loop condition sees it
                continue
            finished.wait(0.05)

    out_chunks, err_chunks = [], []
    threads = [threading.Thread(target=lambda: out_chunks.append(p.stdout.read())),
               threading.Thread(target=lambda: err_chunks.append(p.stderr.read())), threading.Thread(target=poll)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    finished.set()
    for t in threads:
        t.join()
    return {"returncode": p.returncode, "peak_rss_bytes": usage.ru_maxrss * 1024, "vmhwm_bytes": hwm[0], "vmpeak_bytes": vsz[0],
            "rss_cap_exceeded": over[0],
            "seconds": round(time.perf_counter() - t0, 1), "stdout": "".join(out_chunks), "stderr": "".join(err_chunks)}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="A ~100M-parameter model instead of Llama-3.2-3B's shape.")
    ap.add_argument("--workdir", default=None, help="Where the model and outputs go [default: /tmp/quantkit-bench-memory-SHAPE].")
    ap.add_argument("--methods", default="rtn", help="Comma-separated: rtn, gptq (calibrated, --nsamples x --seqlen).")
    ap.add_argument("--cap", type=float, default=0.5, help="The memory cap as a fraction of the model's bytes (0 = no cap).")
    ap.add_argument("--limit", choices=["as", "data", "rss"], default="as",
                    help="as: RLIMIT_AS (virtual size); data: RLIMIT_DATA (heap and private writable mappings); "
                         "rss: a watchdog kills the run above the cap.")
    ap.add_argument("--cap-extra-gb", type=float, default=None,
                    help="Added to the cap [default: 0; 1.5 with --small].")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--calibrated-blocks", type=int, default=None,
                    help="Stop a calibrated method (gptq) after this many blocks (SIGKILL via quantkit's test hook): every "
                         "block has the same shapes, so its peak is the run's peak [default: 2 for the 3B shape, all with --small].")
    ap.add_argument("--shard-gb", type=float, default=5.0, help="Shard size of the written model (Hugging Face's default: 5).")
    ap.add_argument("--keep", action="store_true", help="Keep the model and outputs (the model is reused if kept).")
    ap.add_argument("--json", action="store_true", help="Print one JSON object.")
    return ap


def _interpreter_baseline() -> tuple[dict, int]:
    """The capped-run record of an interpreter that only imports quantkit's CLI and its stack, and its VmPeak in bytes."""
    baseline = run_capped([sys.executable, "-c", "import torch, transformers, quantkit.cli, quantkit.api; "
                                                 "from transformers import LlamaForCausalLM; "
                                                 "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmPeak')][0])"],
                          None)
    return baseline, int(baseline["stdout"].split()[-1]) * 1024


def _run_method(method: str, args, work: Path, cap: int | None, model_bytes: int, baseline: dict) -> dict:
    """One ``quantize --stream`` run of ``method`` under the cap: its row of the table."""
    out = work / f"out-{method}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "quantkit.cli", "quantize", str(work / "model"), "-o", str(out), "--method", method,
           "--bits", "4", "--group-size", str(args.group_size), "--stream", "--json", "--overwrite"]
    if method != "rtn":
        cmd += ["--calib", "c4", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", "4"]
    blocks = args.calibrated_blocks if args.calibrated_blocks is not None else (0 if args.small else 2)
    env = None
    if method != "rtn" and blocks:  # stop the run (SIGKILL) once its first calibrated blocks are written
        cmd = [sys.executable, *cli_killed_after_block(blocks - 1), *cmd[3:]]  # the peak is in the first blocks
        env = dict(os.environ)
    print(f"quantize --method {method} --stream under {LIMIT_NAMES[args.limit]} = {cap / 1e9 if cap else 0:.2f} GB"
          f"{f' (first {blocks} blocks)' if env else ''} ...", file=sys.stderr)
    r = run_capped(cmd, cap, env, args.limit)
    stopped = env is not None and r["returncode"] == -9 and not r["rss_cap_exceeded"] and not out.exists()
    row = {"method": method + (f" ({blocks} blocks)" if env else ""), "ok": r["returncode"] == 0 or stopped,
           "returncode": r["returncode"], "seconds": r["seconds"],
           "peak_rss_bytes": r["peak_rss_bytes"], "vmhwm_bytes": r["vmhwm_bytes"], "vmpeak_bytes": r["vmpeak_bytes"],
           "peak_over_model": round(r["peak_rss_bytes"] / model_bytes, 3),
           "peak_above_baseline_over_model": round((r["peak_rss_bytes"] - baseline["peak_rss_bytes"]) / model_bytes, 3)}
    if stopped:
        row["bytes_after"] = 0
    elif r["returncode"] == 0:
        payload = json.loads(r["stdout"].strip().splitlines()[-1])
        row["bytes_after"] = payload["bytes_after"]
    else:
        row["error"] = "killed by the RSS watchdog" if r["rss_cap_exceeded"] else (r["stderr"].strip().splitlines() or [""])[-1][:300]
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def _print_table(result: dict, limit: str) -> None:
    rows, cap = result["runs"], result["cap_bytes"]
    print(f"\n{result['shape']}: {result['params'] / 1e9:.2f}B parameters, {result['model_bytes'] / 1e9:.2f} GB bf16 in shards; "
          f"{LIMIT_NAMES[limit]} {cap / 1e9 if cap else 0:.2f} GB; interpreter baseline RSS {result['baseline_rss_bytes'] / 1e9:.2f} GB\n")
    print("| method | ok | peak RSS GB | peak / model | (peak - baseline) / model | peak virtual GB | output GB | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {'yes' if r['ok'] else 'NO: ' + r.get('error', '')} | {r['peak_rss_bytes'] / 1e9:.2f} | "
              f"{r['peak_over_model']:.2f}x | {r['peak_above_baseline_over_model']:.2f}x | {r['vmpeak_bytes'] / 1e9:.2f} | "
              f"{r.get('bytes_after', 0) / 1e9:.2f} | {r['seconds']} |")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    shape = "small" if args.small else "llama-3.2-3b"
    work = Path(args.workdir or f"/tmp/quantkit-bench-memory-{shape}")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"writing a random {shape} checkpoint to {work / 'model'} ...", file=sys.stderr)
    model_bytes = write_random_checkpoint(work / "model", shape, int(args.shard_gb * 2**30))
    params = model_bytes // 2
    write_s = time.perf_counter() - t0
    baseline, baseline_vsz = _interpreter_baseline()
    extra = (args.cap_extra_gb if args.cap_extra_gb is not None else 1.5 if args.small else 0.0) * 2**30
    cap = int(model_bytes * args.cap + extra) if args.cap > 0 else None
    rows = [_run_method(method, args, work, cap, model_bytes, baseline)
            for method in [m.strip() for m in args.methods.split(",") if m.strip()]]
    result = {"shape": shape, "params": params, "model_bytes": model_bytes, "limit": args.limit, "cap_bytes": cap,
              "baseline_rss_bytes": baseline["peak_rss_bytes"], "baseline_vsz_bytes": baseline_vsz, "write_seconds": round(write_s, 1),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "runs": rows}
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result, args.limit)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
