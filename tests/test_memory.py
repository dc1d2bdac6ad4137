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


def test_peak_rss_sees_a_300_mb_allocation():
    """Two fresh interpreters, one of which touches 300 MB: the reported peaks differ by about that."""
    prog = "import sys; from quantkit.memory import peak_rss_bytes; b = b'x' * int(sys.argv[1]); print(peak_rss_bytes())"
    env = {"PATH": os.environ.get("PATH", "")}  # a plain interpreter (no settings inherited from the test session)
    peaks = [int(subprocess.run([sys.executable, "-c", prog, str(n)], capture_output=True, text=True, check=True, env=env).stdout)
             for n in (0, 300 * 2**20)]
    assert 250 * 2**20 < peaks[1] - peaks[0] < 400 * 2**20
