"""The decode step on a GPU, replayed from a captured CUDA graph.

A decode step of a small batch launches a few hundred kernels (norms, RoPE, seven linears and an
attention per layer), each of a few microseconds on a GPU: launched one by one from Python the
step is bound by launch latency, not by the weights it streams.  :class:`GraphedDecode` captures
:meth:`quantkit.runtime.lean.LeanLM.static_step` once (its shapes and buffers fixed: the token
ids and the position are copied into static tensors, the KV cache is written in place) and
replays it each token.  The first steps run outside the graph, on a side stream, so Triton
autotunes and every ``QuantLinear`` picks its kernel before the capture.

    >>> lm = LeanLM(model.cuda(), max_len=prompt_len + new_tokens, batch=8)
    >>> lm.forward(prompt_ids)                       # prefill (eager)
    >>> step = GraphedDecode(lm)                     # captures
    >>> logits = step(next_ids)                      # [8, vocab], one replay; lm.pos moves on
"""

from __future__ import annotations

import torch

from quantkit.runtime.lean import LeanLM

WARMUP_STEPS = 2


class GraphedDecode:
    """``(ids [batch, 1]) -> logits [batch, vocab]`` for ``lean``'s batch, one CUDA graph replay per
    call; advances ``lean.pos`` as :meth:`LeanLM.forward` does.  The logits tensor is the graph's
    own output buffer: the next call overwrites it (copy what you keep)."""

    def __init__(self, lean: LeanLM):
        if lean.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a GPU, it is on {lean.device}")
        self.lean = lean
        batch = lean.k_cache[0].shape[0]
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=lean.device)
        self.pos = torch.zeros((), dtype=torch.long, device=lean.device)
        self.pos.fill_(lean.pos)
        side = torch.cuda.Stream(lean.device)
        side.wait_stream(torch.cuda.current_stream(lean.device))
        with torch.cuda.stream(side):  # kernel choice, autotuning, lazy allocations: before the capture
            for _ in range(WARMUP_STEPS):
                lean.static_step(self.ids, self.pos)  # writes the cache row at pos, which the first real step rewrites
        torch.cuda.current_stream(lean.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = lean.static_step(self.ids, self.pos)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        lean = self.lean
        if lean.pos >= lean.capacity:
            raise ValueError(f"the lean cache holds {lean.capacity} positions; {lean.pos + 1} needed")
        self.ids.copy_(ids.reshape(self.ids.shape))
        self.pos.fill_(lean.pos)
        self.graph.replay()
        lean.pos += 1
        return self.logits


def decode_stepper(lean: LeanLM, graphs: bool = True):
    """``ids [batch, n] -> logits [batch, vocab]`` continuing ``lean``'s sequences: prompts (n > 1)
    through :meth:`LeanLM.forward`, single tokens on a GPU through a :class:`GraphedDecode`
    captured at the first one and kept on ``lean`` (``lean.graphed``, dropped when
    :meth:`LeanLM.reset` reallocates the cache); ``graphs=False``, off a GPU, or with MoE blocks
    (their experts are chosen on the host): :meth:`LeanLM.forward`."""

    def step(ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] != 1 or not graphs or lean.device.type != "cuda" or not lean.graphable:
            return lean.forward(ids)
        if lean.graphed is None:
            lean.graphed = GraphedDecode(lean)
        return lean.graphed(ids)

    return step
