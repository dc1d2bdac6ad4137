"""The exported GGUF file in llama.cpp itself (llama-cpp-python; skipped where it is not
installed): same perplexity as quantkit's runtime on the same token windows, same tokenization."""

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from click.testing import CliRunner  # noqa: E402

from quantkit import api  # noqa: E402
from quantkit.cli import cli  # noqa: E402


@pytest.mark.slow
def test_gptq_w4_g32_gguf_perplexity_in_llamacpp_within_one_percent(stories_dir, tiny_text):
    from quantkit.eval.gguf_llamacpp import run

    result = run(str(stories_dir), bits=4, group_size=32, calib=str(tiny_text), nsamples=8, calib_seqlen=128,
                 dataset=str(tiny_text), seqlen=256, max_windows=6, log=lambda *_: None)
    assert result["gguf"]["tensors"]["Q4_0"] == 30  # q, k, v, o, gate, up of 5 blocks; down_proj (172 wide) stays float
    assert result["llamacpp"]["tokens"] == result["quantkit"]["tokens"] == 6 * 255
    assert result["rel_diff"] < 0.01, result


def test_llamacpp_tokenizes_like_the_source_tokenizer(stories, tmp_path):
    model, tok = stories
    res = api.compress(model, "rtn", dict(bits=4, group_size=32, ignore=(r"mlp\.down_proj$",)))
    api.save(model, tok, tmp_path / "qk", "rtn", res)
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "qk"), "--format", "gguf", "-o", str(tmp_path / "s.gguf")])
    assert r.exit_code == 0, r.output
    llm = llama_cpp.Llama(model_path=str(tmp_path / "s.gguf"), vocab_only=True, verbose=False)
    for text in ("Once upon a time, there was a little girl named Lily.", "She said: \"Wow!\" and ran home\nto 42 friends."):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text, add_special_tokens=False).input_ids
    assert llm.token_bos() == 1 and llm.token_eos() == 2
    llm.close()
