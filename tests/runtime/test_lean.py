"""quantkit.runtime.lean: the lean forward computes what transformers' forward computes."""

import copy

import pytest
import torch
import transformers
from transformers import DynamicCache

from quantkit import api
from quantkit.runtime.lean import LeanLM, LeanUnsupported, lean_or_none
from quantkit.models.moe import unfuse_experts
from quantkit.testing import tiny_llama, tiny_moe, tiny_opt

SMALL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def _family(name: str, **extra):
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{name}Config")(**SMALL, **extra)
    model = getattr(transformers, f"{name}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # non-trivial norms (and Qwen's q/k norms), so a skipped norm shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def _gemma3(window: int = 6):
    """A tiny Gemma 3 text model: a local (sliding, its own RoPE base) and a global layer."""
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=window,
                                        layer_types=["sliding_attention", "full_attention"])
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(0.3 * torch.randn_like(p))  # Gemma weighs by 1 + w
    return model


def _hf_steps(model, ids, steps):
    """transformers' logits for the prompt's last position, then for each greedy step."""
    cache = DynamicCache(config=model.config)
    out = model(ids, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1].float()]
    for _ in range(steps):
        out = model(logits[-1].argmax(-1, keepdim=True), past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1].float())
    return logits


def _lean_steps(model, ids, steps):
    lm = LeanLM(model, max_len=ids.shape[1] + steps + 1, batch=ids.shape[0])
    logits = [lm.forward(ids)]
    for _ in range(steps):
        logits.append(lm.forward(logits[-1].argmax(-1, keepdim=True)))
    return logits


@pytest.mark.parametrize("build", [
    lambda: tiny_llama(0),
    lambda: _family("Mistral"),
    lambda: _family("Qwen2"),  # biased q/k/v
    lambda: _family("Qwen3", head_dim=16),  # per-head q/k norms
    lambda: _family("Llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    lambda: _family("Mistral", sliding_window=6),  # a window shorter than the prompt: prefill mask, decode slice
    lambda: _family("Gemma", head_dim=16),  # (1 + w) norms, scaled embeddings, GELU
    lambda: _family("Gemma2", head_dim=16, sliding_window=6),  # sandwich norms, soft-caps, alternating windows
    _gemma3,  # q/k norms, a RoPE table per layer type
    lambda: _family("Phi3", sliding_window=6, pad_token_id=0),  # fused qkv and gate_up projections
], ids=["llama", "mistral", "qwen2", "qwen3", "llama3-rope", "mistral-window", "gemma", "gemma2", "gemma3", "phi3"])
def test_matches_transformers_prefill_and_decode(build):
    model = build()
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, got = _hf_steps(model, ids, 5), _lean_steps(model, ids, 5)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_moe_blocks_match_transformers_fused_experts(family):
    stock = tiny_moe(family, experts=8, top_k=2)  # transformers' own model: 3-D expert weights
    model = copy.deepcopy(stock)
    unfuse_experts(model)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, got = _hf_steps(stock, ids, 5), _lean_steps(model, ids, 5)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_real_model_and_chunked_prefill(stories):
    """stories260K: one prefill, or the prompt in three chunks, or token by token: same logits."""
    model, _ = stories
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = model(ids).logits[:, -1].float()
        whole = LeanLM(model, 32).forward(ids)
        chunked = LeanLM(model, 32)
        for part in ids.split([10, 1, 13], dim=1):
            last = chunked.forward(part)
    torch.testing.assert_close(whole, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, ref, rtol=1e-4, atol=1e-4)


def test_packed_model_bf16(stories, monkeypatch):
    """A packed int4 model in bfloat16: the same QuantLinear calls as transformers' forward, so
    only the attention's precision differs (float32 in the lean forward on a CPU)."""
    model, _ = stories
    api.compress(model, "rtn", {"bits": 4, "group_size": -1}, pack=True)
    model = model.to(torch.bfloat16)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref, got = _hf_steps(model, ids, 4), _lean_steps(model, ids, 4)
    for r, g in zip(ref, got):
        assert (g - r).abs().max() < 0.05 * r.abs().max()
        assert torch.equal(g.argmax(-1), r.argmax(-1))


def test_unsupported_models_say_why():
    assert lean_or_none(tiny_opt())[0] is None and "opt" in lean_or_none(tiny_opt())[1]
    model = _family("Llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(LeanUnsupported, match="dynamic"):
        LeanLM(model, max_len=64)
    lm = LeanLM(tiny_llama(0), max_len=8)
    with pytest.raises(ValueError, match="holds 8 positions"):
        lm.forward(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("build", [lambda: tiny_llama(0), lambda: _family("Qwen3", head_dim=16),
                                   lambda: _family("Gemma2", head_dim=16, sliding_window=4)], ids=["llama", "qwen3", "gemma2"])
def test_static_step_equals_forward(build):
    """The CUDA-graph form of a decode step (fixed shapes: index_copy into the cache, attention over
    all of it under a mask) gives forward's logits and leaves the same cache, batch 2."""
    model = build()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(4))
    eager, static = LeanLM(model, max_len=16, batch=2), LeanLM(model, max_len=16, batch=2)
    with torch.inference_mode():
        eager.forward(ids), static.forward(ids)
        nxt = torch.tensor([[3], [5]])
        for _ in range(3):
            ref = eager.forward(nxt)
            got = static.static_step(nxt, torch.tensor(static.pos))
            static.pos += 1
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            nxt = ref.argmax(-1, keepdim=True)
    for a, b in zip(eager.k_cache + eager.v_cache, static.k_cache + static.v_cache):
        torch.testing.assert_close(a[:, :, :eager.pos], b[:, :, :eager.pos])


def test_decode_stepper_off_a_gpu_is_forward():
    from quantkit.runtime.cudagraph import GraphedDecode, decode_stepper

    model = tiny_llama(0)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(5))
    a, b = LeanLM(model, max_len=8), LeanLM(model, max_len=8)
    step = decode_stepper(b)
    with torch.inference_mode():
        torch.testing.assert_close(step(ids), a.forward(ids))
        torch.testing.assert_close(step(ids[:, :1]), a.forward(ids[:, :1]))
    with pytest.raises(ValueError, match="GPU"):
        GraphedDecode(a)


@pytest.mark.gpu
def test_graphed_decode_matches_eager_on_cuda():
    """On a GPU: greedy tokens from the replayed CUDA graph equal the eager lean forward's, for a
    float and a packed int4 (Triton) model."""
    from quantkit.runtime.cudagraph import decode_stepper

    for pack in (False, True):
        model = tiny_llama(0)
        if pack:
            api.compress(model, "rtn", {"bits": 4, "group_size": 32}, pack=True)
        model = model.to("cuda", torch.float16)
        ids = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(6)).cuda()
        eager, graphed = LeanLM(model, 24, batch=4), LeanLM(model, 24, batch=4)
        step = decode_stepper(graphed)
        with torch.inference_mode():
            a, b = eager.forward(ids), step(ids)
            for _ in range(8):
                na, nb = a.argmax(-1, keepdim=True), b.argmax(-1, keepdim=True)
                assert torch.equal(na, nb)
                a, b = eager.forward(na), step(nb).clone()
                torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)


def _alone(model, prompt, steps):
    """Greedy logits of one sequence on its own lean forward: the reference for a row of a batch."""
    lm = LeanLM(model, 64)
    out = [lm.forward(torch.tensor([prompt]))]
    for _ in range(steps):
        out.append(lm.forward(out[-1].argmax(-1, keepdim=True)))
    return out


@pytest.mark.parametrize("kind", ["float", "int4", "gemma3-window", "qwen3-moe"])
def test_rows_of_their_own_lengths_decode_as_they_would_alone(stories, kind):
    """The serving engine's use: rows prefilled one at a time (the cache grows from 4 columns and
    1 row), stepped together at their own positions, a row dropped and the rest moved up; each
    row's logits are those it gets alone (the lone last row on the native step when int4; with
    Gemma 3's 4-token window, each row's own window; with experts, each row's own)."""
    model, _ = stories
    packed = kind == "int4"
    if packed:
        api.compress(model, "rtn", {"bits": 4, "group_size": -1}, pack=True)
    if kind == "gemma3-window":
        model = _gemma3(window=4)
    if kind == "qwen3-moe":  # rows stepped together route their tokens through the experts as one group
        model = tiny_moe("qwen3_moe", experts=8, top_k=2)
        unfuse_experts(model)
    prompts = [[1, 5, 9], [1, 7, 3, 8, 2, 11, 4], [1, 2]]
    refs = [_alone(model, p, 6) for p in prompts]
    lm = LeanLM(model, 64, batch=1, capacity=4)
    with torch.inference_mode():
        got = [[lm.prefill_row(r, torch.tensor([p]))] for r, p in enumerate(prompts)]
        rows, pos = [0, 1, 2], [len(p) for p in prompts]
        for step in range(6):
            if step == 3:  # row 1 leaves; rows 0 and 2 move up, then row 2 alone
                lm.keep_rows([2, 0], max(pos))
                rows, pos = [2, 0], [pos[2], pos[0]]
            if step == 5:
                lm.keep_rows([1], max(pos))
                rows, pos = [0], [pos[1]]
            ids = torch.tensor([[int(got[r][-1].argmax())] for r in rows])
            logits = lm.step_rows(ids, torch.tensor(pos))
            for i, r in enumerate(rows):
                got[r].append(logits[i:i + 1])
            pos = [p + 1 for p in pos]
    assert lm.capacity >= 8 and lm.k_cache[0].shape[0] == 3
    for r in range(3):
        for g, ref in zip(got[r], refs[r]):
            assert (g - ref).abs().max() <= (1e-3 if packed else 1e-5) * ref.abs().max()


@pytest.mark.parametrize("packed", [False, True], ids=["float", "int4"])
def test_a_lone_row_grows_the_cache_as_it_decodes(stories, packed):
    """The serving engine's last row decoding past the allocated columns: the cache grows first (the
    native step, where it runs, is rebuilt over the new cache rather than writing past the old one)."""
    model, _ = stories
    if packed:
        api.compress(model, "rtn", {"bits": 4, "group_size": -1}, pack=True)
    ref = _alone(model, [1, 5, 9], 6)
    lm = LeanLM(model, 64, capacity=4)
    with torch.inference_mode():
        got = [lm.prefill_row(0, torch.tensor([[1, 5, 9]]))]
        for step in range(6):
            got.append(lm.step_rows(got[-1].argmax(-1, keepdim=True), torch.tensor([3 + step])))
    assert lm.capacity >= 9
    for g, r in zip(got, ref):
        assert (g - r).abs().max() <= (1e-3 if packed else 1e-5) * r.abs().max()
    assert all(lay.window is None for lay in LeanLM(_family("Mistral", sliding_window=4096), 64).layers)  # wider than the cache: none
