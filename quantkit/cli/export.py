"""``quantkit export``: a quantkit checkpoint in a format other engines run (GPTQ tensors, GGUF)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from quantkit.cli.common import emit, err_console, json_option
from quantkit.errors import QuantkitError


@click.command()
@click.argument("checkpoint")
@click.option("--format", "fmt", type=click.Choice(["gptq", "gguf", "compressed-tensors"]), required=True,
              help="gptq: qweight/qzeros/scales/g_idx as transformers, GPTQModel and vLLM read them. "
                   "gguf: one file llama.cpp runs (4-bit sym -> Q4_0, 4-bit asym -> Q4_1, 8-bit sym -> Q8_0). "
                   "compressed-tensors: llm-compressor's format, for vLLM and SGLang (4/8-bit weight-only, W8A8).")
@click.option("-o", "--output", "output", required=True, help="A directory (gptq) or a .gguf file (gguf).")
@click.option("--float-type", type=click.Choice(["f16", "f32"]), default="f16", show_default=True,
              help="gguf: type of float matrices (embeddings, layers left in float); norms are always F32.")
@click.option("--requant", type=click.Choice(["f32", "f16", "q8_0"]), default=None,
              help="gguf: write layers whose grid has no exact ggml type (3-bit, groups not a multiple of 32, "
                   "act-order without static groups) in this type instead of refusing.")
@click.option("--tokenizer-pre", default=None,
              help="gguf: llama.cpp pre-tokenizer name for byte-level BPE vocabularies (default: recognised from tokenizer.json).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists and quantkit wrote it (gguf: a GGUF file).")
@json_option
def export(checkpoint, fmt, output, float_type, requant, tokenizer_pre, overwrite, as_json):
    """Export a quantkit CHECKPOINT to a format other engines run."""
    from quantkit.checkpoint.compressed import export_compressed_tensors
    from quantkit.checkpoint.gguf import export_gguf
    from quantkit.checkpoint.gptq import export_gptq
    from quantkit.models.load import dir_bytes

    if fmt == "gguf":
        summary = export_gguf(checkpoint, output, float_type=float_type, requant=requant, tokenizer_pre=tokenizer_pre,
                              overwrite=overwrite)
        payload = {"output": os.path.abspath(output), "format": fmt, "bytes": summary["bytes"], "tensors": summary["tensors"],
                   "tokenizer": summary["tokenizer"]}
    elif fmt == "compressed-tensors":
        if requant or tokenizer_pre or float_type != "f16":
            raise QuantkitError("--float-type, --requant and --tokenizer-pre apply to --format gguf only")
        summary = export_compressed_tensors(checkpoint, output, overwrite)
        payload = {"output": os.path.abspath(output), "format": fmt, "bytes": dir_bytes(output), "tensors": summary["formats"]}
    else:
        if requant or tokenizer_pre or float_type != "f16":
            raise QuantkitError("--float-type, --requant and --tokenizer-pre apply to --format gguf only")
        export_gptq(checkpoint, output, overwrite)
        payload = {"output": os.path.abspath(output), "format": fmt, "bytes": dir_bytes(output)}
        head = json.loads((Path(output) / "quantize_config.json").read_text()).get("lm_head")
        if head:
            err_console.print("[yellow]note[/] the head is quantized (lm_head: true): vLLM and GPTQModel load it, "
                              "transformers' GPTQ loader does not (it converts block linears only)")
    emit(as_json, payload, None)
    if not as_json:
        kinds = ", ".join(f"{n} {t}" for t, n in payload.get("tensors", {}).items())
        err_console.print(f"wrote {fmt} checkpoint to {output} ({payload['bytes'] / 1e6:.1f} MB{'; ' + kinds if kinds else ''})")
