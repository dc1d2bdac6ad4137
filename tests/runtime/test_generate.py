"""quantkit.runtime.generate: sampling filters, text streaming, the decode loop on the stories260K fixture, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from quantkit.errors import QuantkitError
from quantkit.runtime.generate import (
    GREEDY_TEMPERATURE,
    SamplingParams,
    TextStream,
    encode_chat,
    encode_prompt,
    filter_logits,
    generate,
    make_generator,
    sample_next,
    stream_generate,
)

FIXTURE = str(Path(__file__).resolve().parents[1] / "fixtures" / "stories260K")
LILY = "Once upon a time, there was a little girl named Lily."


@pytest.fixture(scope="module")
def model_tok():
    from quantkit.checkpoint.formats import load_model

    old = torch.get_num_threads()
    torch.set_num_threads(1)  # a 260K-parameter model: threads only add sync overhead
    yield load_model(FIXTURE)
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------- sampling


def test_filter_logits_top_k_keeps_exactly_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = filter_logits(logits, temperature=1.0, top_k=2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]


def test_filter_logits_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = filter_logits(probs.log(), temperature=1.0, top_p=0.8)
    assert torch.isfinite(out).tolist() == [True, True, False, False]  # 0.5 < 0.8 <= 0.5 + 0.3
    out = filter_logits(probs.log(), temperature=1.0, top_p=0.81)
    assert torch.isfinite(out).tolist() == [True, True, True, False]
    out = filter_logits(probs.log(), temperature=1.0, top_p=0.01)  # the likeliest always stays
    assert torch.isfinite(out).tolist() == [True, False, False, False]


def test_filter_logits_temperature_sharpens():
    logits = torch.tensor([1.0, 2.0])
    cold = filter_logits(logits, temperature=0.5).softmax(-1)
    hot = filter_logits(logits, temperature=2.0).softmax(-1)
    assert cold[1] > logits.softmax(-1)[1] > hot[1]


def test_sample_next_greedy_seeded_and_within_top_k():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(100, generator=g)
    assert sample_next(logits, SamplingParams(temperature=0)) == int(logits.argmax())
    params = SamplingParams(temperature=1.5, top_k=5, seed=7)
    top5 = set(torch.topk(logits, 5).indices.tolist())
    a = [sample_next(logits, params, make_generator(7)) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same token
    gen = make_generator(7)
    draws = {sample_next(logits, params, gen) for _ in range(200)}
    assert draws <= top5 and len(draws) > 1


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, GREEDY_TEMPERATURE / 2])
def test_a_temperature_below_the_floor_is_greedy(temperature):
    """Audit E13/B64: 1e-300 passed validation, divided the logits into inf/NaN and multinomial raised."""
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=temperature, top_k=5, top_p=0.9)
    assert params.greedy and not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy
    assert sample_next(logits, params, make_generator(0)) == int(logits.argmax())


def test_sampling_never_raises_on_finite_logits():
    big = torch.finfo(torch.float32).max
    rows = [torch.tensor([big, -big, 0.0, big]), torch.tensor([-big, -big / 2, 1.0]), torch.full((8,), -big),
            torch.tensor([0.0, float("-inf"), 1.0])]
    gen = make_generator(0)
    for logits in rows:
        for t in (GREEDY_TEMPERATURE, 0.7, 2.0):
            for k, p in ((0, 1.0), (2, 0.5)):
                probs = filter_logits(logits, t, k, p).softmax(-1)
                assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-9
                tok = sample_next(logits, SamplingParams(temperature=t, top_k=k, top_p=p), gen)
                assert probs[tok] > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sampling_non_finite_logits_is_a_clear_error(bad):
    with pytest.raises(QuantkitError, match="NaN or infinite"):
        sample_next(torch.tensor([0.0, bad, 1.0]), SamplingParams(temperature=1.0), make_generator(0))
    with pytest.raises(QuantkitError, match="NaN or infinite"):
        sample_next(torch.full((3,), float("-inf")), SamplingParams(temperature=1.0), make_generator(0))


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(temperature=float("nan")),
                                    dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(stop=("",))])
def test_sampling_params_reject_bad_values(kwargs):
    with pytest.raises(QuantkitError):
        SamplingParams(**kwargs)


# ---------------------------------------------------------------------------------------- text stream


def test_text_stream_emits_only_complete_utf8(model_tok):
    _, tok = model_tok
    text = " héllo 😀 wörld ✓"
    ids = tok(text, add_special_tokens=False).input_ids
    assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids))  # byte-fallback pieces present
    stream = TextStream(tok, [tok.bos_token_id])
    deltas = [stream.push(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)
    assert "" in deltas  # some tokens completed no character


def test_text_stream_cuts_stop_string_across_tokens(model_tok):
    _, tok = model_tok
    ids = tok(" a little girl named Lily. She", add_special_tokens=False).input_ids
    stream = TextStream(tok, [tok.bos_token_id], stop=("named Li",))
    deltas = []
    for i in ids:
        deltas.append(stream.push(i))
        if stream.stopped:
            break
    assert stream.stopped and "".join(deltas) == " a little girl "
    # a held-back prefix of a stop string that never completes is released by flush()
    stream = TextStream(tok, [tok.bos_token_id], stop=("girl named Tom",))
    out = "".join(stream.push(i) for i in ids[:6])
    assert not stream.stopped and out + stream.flush() == tok.decode(ids[:6])


# ---------------------------------------------------------------------------------------- decode loop


def test_greedy_from_bos_is_the_known_story(model_tok):
    model, tok = model_tok
    g = generate(model, tok, encode_prompt(tok, ""), SamplingParams(max_new_tokens=16))
    assert g.text.startswith(LILY)
    assert g.finish_reason == "length" and g.completion_tokens == 16 and g.prompt_tokens == 1


def test_stream_equals_generate_and_hf(model_tok):
    model, tok = model_tok
    ids = encode_prompt(tok, "The dog ran")
    params = SamplingParams(max_new_tokens=30)
    g = generate(model, tok, ids, params)
    assert "".join(stream_generate(model, tok, ids, params)) == g.text
    ref = model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)[0, len(ids):]
    assert g.token_ids == ref.tolist()[: len(g.token_ids)]


def test_lean_and_transformers_forward_generate_alike(model_tok):
    model, tok = model_tok
    ids = encode_prompt(tok, "The cat")
    params = SamplingParams(max_new_tokens=24, temperature=0.8, top_k=20, seed=3)
    assert generate(model, tok, ids, params).token_ids == generate(model, tok, ids, params, lean=False).token_ids


def test_stop_string_and_eos(model_tok):
    model, tok = model_tok
    g = generate(model, tok, encode_prompt(tok, ""), SamplingParams(max_new_tokens=40, stop=("Lily", "zzz")))
    assert g.text == "Once upon a time, there was a little girl named " and g.finish_reason == "stop"
    # EOS: make the model's EOS the token it would greedily produce next
    first = generate(model, tok, encode_prompt(tok, ""), SamplingParams(max_new_tokens=3)).token_ids
    old = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [first[2]]
        g = generate(model, tok, encode_prompt(tok, ""), SamplingParams(max_new_tokens=10))
        assert g.finish_reason == "stop" and g.token_ids == first[:2]
        g = generate(model, tok, encode_prompt(tok, ""), SamplingParams(max_new_tokens=10, ignore_eos=True))
        assert g.completion_tokens == 10
    finally:
        model.generation_config.eos_token_id = old


def test_seeded_sampling_is_reproducible(model_tok):
    model, tok = model_tok
    ids = encode_prompt(tok, "Once")
    texts = [generate(model, tok, ids, SamplingParams(max_new_tokens=24, temperature=1.2, top_p=0.95, seed=s)).text
             for s in (1, 1, 2, 3)]
    assert texts[0] == texts[1]
    assert len(set(texts[1:])) > 1


def test_custom_cache_factory_is_used(model_tok):
    from transformers import DynamicCache

    model, tok = model_tok
    made = []

    def factory(m):
        made.append(DynamicCache(config=m.config))
        return made[-1]

    ids = encode_prompt(tok, "")
    g = generate(model, tok, ids, SamplingParams(max_new_tokens=8), cache=factory)
    assert len(made) == 1 and made[0].get_seq_length() == len(ids) + 7  # the last token is never fed back
    assert g.text == generate(model, tok, ids, SamplingParams(max_new_tokens=8)).text
    obj = DynamicCache(config=model.config)
    generate(model, tok, ids, SamplingParams(max_new_tokens=4), cache=obj)
    assert obj.get_seq_length() == len(ids) + 3


def test_context_limit(model_tok):
    model, tok = model_tok
    n_ctx = model.config.max_position_embeddings
    with pytest.raises(QuantkitError, match="context"):
        generate(model, tok, [1] * n_ctx, SamplingParams(max_new_tokens=1))
    g = generate(model, tok, [1] * (n_ctx - 3), SamplingParams(max_new_tokens=50, ignore_eos=True))
    assert g.finish_reason == "length" and g.completion_tokens == 3


def test_chat_fallback_and_template(model_tok):
    _, tok = model_tok
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert not tok.chat_template
    assert tok.decode(encode_chat(tok, msgs), skip_special_tokens=True) == "System: Be brief.\nUser: Hi\nAssistant:"
    tok2 = type(tok).from_pretrained(FIXTURE)
    tok2.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert tok2.decode(encode_chat(tok2, msgs)) == "<system>Be brief.<user>Hi<assistant>"


def test_generate_cli_json_and_stream():
    from quantkit.cli import cli

    r = CliRunner().invoke(cli, ["generate", FIXTURE, "", "--max-new-tokens", "12", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["text"].startswith("Once upon a time") and out["completion_tokens"] == 12
    r = CliRunner().invoke(cli, ["generate", FIXTURE, "Once upon", "--max-new-tokens", "8"])
    assert r.exit_code == 0 and r.output.startswith(" a time, there was")
    r = CliRunner().invoke(cli, ["generate", FIXTURE, "x", "--top-p", "0"])
    assert r.exit_code == 1 and "top_p" in r.output


def test_generate_cli_tiny_temperature_is_greedy():
    """Audit B64: ``--temperature 1e-300`` ended in 'internal error'; it is greedy."""
    from quantkit.cli import cli

    r = CliRunner().invoke(cli, ["generate", FIXTURE, "Once upon", "--max-new-tokens", "8", "--temperature", "1e-300"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(" a time, there was")


def test_generate_cli_int8_kv_cache_and_transformers_forward(monkeypatch):
    """--kv-bits runs transformers' forward with the quantized cache (the factory is really used)."""
    from quantkit.cli import cli
    from quantkit.runtime import kvcache

    made = []
    original = kvcache.QuantizedKVCache.for_model
    monkeypatch.setattr(kvcache.QuantizedKVCache, "for_model",
                        classmethod(lambda cls, m, c: made.append(c) or original.__func__(cls, m, c)))
    outs = {}
    for flags in ([], ["--kv-bits", "8"], ["--kv-bits", "4", "--kv-keys", "channel"], ["--no-lean"]):
        r = CliRunner().invoke(cli, ["generate", FIXTURE, "", "--max-new-tokens", "12", "--json", *flags])
        assert r.exit_code == 0, r.output
        outs[" ".join(flags)] = json.loads(r.output.strip().splitlines()[-1])["text"]
    assert [(c.bits, c.keys) for c in made] == [(8, "token"), (4, "channel")]
    assert outs["--kv-bits 8"] == outs[""] == outs["--no-lean"]  # int8 KV keeps this short greedy story
    r = CliRunner().invoke(cli, ["generate", FIXTURE, "x", "--kv-bits", "3"])
    assert r.exit_code == 2 and "3" in r.output
