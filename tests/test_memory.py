"""quantkit.memory: peak RSS and the process-level memory settings of the console script."""

import os
import subprocess
import sys

import pytest

from quantkit.memory import peak_rss_bytes

CHECK = """
import sys
from quantkit.memory import keep_triton_unloaded
print(keep_triton_unloaded(sys.argv[1:2]))
try:
    import triton
    print("imported")
except ImportError:
    print("refused")
"""


def _run(argv, **env):
    env = {k: v for k, v in {**os.environ, **env}.items() if v}  # an empty value unsets the variable
    out = subprocess.run([sys.executable, "-c", CHECK, *argv], capture_output=True, text=True, env=env, check=True)
    return out.stdout.split()


@pytest.mark.skipif(sys.platform != "linux", reason="Linux process settings")
def test_compression_commands_keep_triton_out_of_a_cpu_process():
    pytest.importorskip("triton")
    import torch

    if torch.cuda.is_available():
        pytest.skip("with CUDA, Triton is the kernel path")
    assert _run(["quantize"], TRITON_INTERPRET="") == ["True", "refused"]
    assert _run(["serve"], TRITON_INTERPRET="") == ["False", "imported"]  # the runtime may want it
    assert _run([], TRITON_INTERPRET="") == ["False", "imported"]
    assert _run(["quantize"], TRITON_INTERPRET="1") == ["False", "imported"]  # explicitly asked for the interpreter


def test_peak_rss_is_plausible():
    assert 10 * 2**20 < peak_rss_bytes() < 64 * 2**30
