#!/usr/bin/env bash
# Wheels for running the GPU check, quantkit/eval/gpu_check.py (issue 20), on a GPU machine that has no network, into .whl/
# (git-ignored): quantkit itself and what its runtime needs beyond that machine's image (torch 2.11 +
# CUDA 13, triton 3.6, transformers 5.17, click, rich, numpy, safetensors...): the transformers and hub
# client versions quantkit is tested with (constraints.txt), their new dependencies, and gguf.
# Python 3.12, x86-64 manylinux; under 64 MiB in all.  Then, on the GPU machine, from the checkout:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 -m quantkit.eval.gpu_check
#
# and `PYTHONPATH=/tmp/site python3 -m pytest -m gpu` for the GPU tests.  GPU_PY (default 3.12, the
# machine's python3) and WHEELS (default .whl) rehearse it elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${GPU_PY:-3.12}
dir=${WHEELS:-.whl}
pin() { grep -i "^$1==" constraints.txt | head -1; }
rm -rf "$dir" && mkdir -p "$dir"
python3 -m pip wheel --quiet --no-deps --no-build-isolation -w "$dir" .
# not typer: the image has one, and the pinned one wants pydantic, which it lacks
wanted=(transformers huggingface_hub tokenizers kernels httpx2 httpcore2 hf-xet truststore tomlkit click gguf)
pins=()
for name in "${wanted[@]}"; do
  p=$(pin "$name") || { echo "gpu_bundle: $name is not pinned in constraints.txt" >&2; exit 1; }
  pins+=("$p")
done
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  "${platforms[@]}" -d "$dir" "${pins[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
total=$(du -cb "$dir"/*.whl | tail -1 | cut -f1)
echo "gpu_bundle: $(ls "$dir" | wc -l) wheels for Python $py, $((total / 1024 / 1024)) MiB in $dir/"
[ "$total" -lt $((60 * 1024 * 1024)) ] || { echo "gpu_bundle: over the 64 MiB a device call carries" >&2; exit 1; }
