"""A run killed with SIGKILL never leaves a half-written OUT that looks finished."""

import json
import os
import signal
import subprocess
import sys
import time


def test_sigkill_during_write_leaves_no_output(stories_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "quantkit.cli", "quantize", str(stories_dir), "-o", str(out), "--method", "rtn",
           "--bits", "4", "--group-size", "-1"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = False
    deadline = time.time() + 120
    while p.poll() is None and time.time() < deadline:
        if any(e.name.startswith(".out.tmp-") for e in tmp_path.iterdir()):
            os.kill(p.pid, signal.SIGKILL)  # the checkpoint is being written right now
            killed = True
            break
        time.sleep(0.002)
    p.wait(timeout=60)
    if killed:
        assert not out.exists()
    else:  # the write was too quick to catch: then OUT must be complete
        assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
        assert (out / "model.safetensors").stat().st_size > 0
