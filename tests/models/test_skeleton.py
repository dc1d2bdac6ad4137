"""The header checks made before any weight is read (preflight, StreamSource.check_names)."""

import json
import re
import shutil
import struct

import pytest
from click.testing import CliRunner

from quantkit.checkpoint.formats import load_model
from quantkit.cli import cli
from quantkit.errors import QuantkitError

Q = "model.layers.0.self_attn.q_proj.weight"


def lie_about_dtype(path, name: str, dtype: str) -> None:
    """Rewrite ``name``'s header dtype in place (same length: the span and shape stay consistent)."""
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header[name]["dtype"] = dtype
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    raw[8:8 + n] = new + b" " * (n - len(new))
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_an_integer_dtype_for_a_float_parameter_is_refused(stories_dir, tmp_path, stream):  # A06
    m = tmp_path / "m"
    shutil.copytree(stories_dir, m)
    lie_about_dtype(m / "model.safetensors", Q, "I32")
    message = (f"cannot load {m}: {Q} is stored as int32, an integer type, for a float parameter (float32): "
               "its bytes would be cast, not read")
    with pytest.raises(QuantkitError, match=f"^{re.escape(message)}$"):
        load_model(str(m))
    r = CliRunner().invoke(cli, ["quantize", str(m), "-o", str(tmp_path / "out"), "--method", "rtn", "--bits", "4",
                                 "--group-size", "-1", *stream])
    assert r.exit_code == 1 and "Traceback" not in r.output and r.output.strip().splitlines()[-1] == f"Error: {message}"
    assert not (tmp_path / "out").exists()
