"""The bytes every recipe in ``recipes/`` writes on the stories260K fixture, as sha256 per file: a
refactor that must not change behaviour compares them before and after (same machine, same thread
count: GPTQ's Hessian sums depend on both).

    python -m quantkit.eval.recipe_hashes --out eval/RECIPE-HASHES.json           # record
    python -m quantkit.eval.recipe_hashes --check eval/RECIPE-HASHES.json         # compare

Each recipe runs as ``quantkit run`` with a small calibration set (8 x 128 tokens) and group size 4
where it names one (stories260K's 172-wide MLP takes no larger power of two), on one thread.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from quantkit.checkpoint.output import MARKER

ROOT = Path(__file__).resolve().parents[2]


def _overrides(recipe: Path) -> list[str]:
    spec = yaml.safe_load(recipe.read_text())
    sets = []
    if spec.get("calibration"):
        sets += ["calibration.nsamples=8", "calibration.seqlen=128"]
    for i, step in enumerate(spec.get("steps", [])):
        if "group_size" in step and step["group_size"] != -1:
            sets.append(f"steps.{i}.group_size=4")
    return [a for s in sets for a in ("--set", s)]


def hashes(recipe: Path, model: Path) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "quantkit.cli", "run", str(recipe), str(model), "-o", str(out), *_overrides(recipe)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=ROOT)
        if r.returncode:
            return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
        return {p.name: hashlib.sha256(_stable_bytes(p)).hexdigest() for p in sorted(out.iterdir())
                if p.is_file() and p.name != MARKER}  # the marker says who wrote OUT, not what


def _stable_bytes(path: Path) -> bytes:
    """The file's bytes; for the per-module log, without its wall-clock ``seconds`` column."""
    if path.name != "quant_log.csv":
        return path.read_bytes()
    with open(path, newline="") as f:
        rows = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]
    return json.dumps(rows).encode()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # relative to the repository root, where the runs start: config.json records the path it was given
    ap.add_argument("--model", default="tests/fixtures/stories260K")
    ap.add_argument("--recipes", default="recipes")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", help="write the hashes here")
    group.add_argument("--check", help="compare with the hashes recorded here; exit 1 on a difference")
    args = ap.parse_args(argv)
    result = {r.name: hashes(r, Path(args.model)) for r in sorted((ROOT / args.recipes).glob("*.yaml"))}
    if args.out:
        record = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "recipes": result}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return 0
    want = json.loads(Path(args.check).read_text())["recipes"]
    bad = {name: sorted(k for k in set(got) | set(want.get(name, {})) if got.get(k) != want.get(name, {}).get(k))
           for name, got in result.items()}
    bad = {k: v for k, v in bad.items() if v}
    print(json.dumps({"identical": not bad, "differ": bad}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
