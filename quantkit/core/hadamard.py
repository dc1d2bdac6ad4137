"""Hadamard transforms for rotations (QuaRot, SpinQuant): orthonormal ``n x n`` matrices that
spread every input feature over all outputs, and a fast transform that applies one in
``O(n (k + 128 r))`` with a few small products (``r`` Sylvester factors of order <= 128; the
runtime's C transform, ``kernels/hadamard.c``, does the butterflies in ``O(n (log n + k))``).

A size ``n = k * 2^m`` gets ``kron(A_k, H_2^m)``: ``H_2^m`` Sylvester's Hadamard matrix (a
Kronecker product of smaller Sylvester matrices; :func:`fwht` gives its butterflies), ``A_k`` a Hadamard matrix of order ``k`` built by
Paley's constructions (orders ``q + 1``, ``q`` a prime ``= 3 mod 4``, e.g. 12, 20, 24, 32, 44, 48;
and ``2 (q + 1)``, ``q`` a prime ``= 1 mod 4``, e.g. 12, 28, 36, 60, 76), the smallest ``k`` that
works, up to :data:`MAX_FACTOR`.  SmolLM2's 576 = 36 x 16 and 1536 = 12 x 128 are exact Hadamard sizes.  When no Hadamard
order fits (stories260K's 172 = 43 x 4, Llama-2's 11008 = 43 x 256) ``A_k`` is the orthonormal DCT-II of order ``k``, the odd
part of ``n``: still orthogonal (the function is preserved) and dense, only less even.

    >>> t = HadamardTransform(576)
    >>> torch.allclose(t(x), x @ t.matrix().to(x.dtype), atol=1e-5)   # the dense reference
    True
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from quantkit.errors import QuantkitError


MAX_FACTOR = 256  # largest dense Hadamard factor used: the online transform costs k per feature


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley_q(k: int) -> tuple[str, int] | None:
    """Which Paley construction gives a Hadamard matrix of order ``k`` (and its prime ``q``)."""
    if k >= 4 and _is_prime(k - 1) and (k - 1) % 4 == 3:
        return "I", k - 1
    if k % 2 == 0 and k >= 6 and _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return "II", k // 2 - 1
    return None


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)`` over GF(q), ``chi`` the quadratic character."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if x in squares else -1 for x in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).unsqueeze(0) - torch.arange(q).unsqueeze(1)) % q
    return chi[idx]


def _paley(kind: str, q: int) -> torch.Tensor:
    """A (+-1) Hadamard matrix by Paley's construction I (order q+1) or II (order 2(q+1))."""
    jac = _jacobsthal(q)
    ones = torch.ones(q, dtype=torch.float64)
    if kind == "I":  # H = I + S, S skew-symmetric: [[0, 1^T], [-1, Q]]
        s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = ones, -ones, jac
        return s + torch.eye(q + 1, dtype=torch.float64)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)  # symmetric conference matrix
    c[0, 1:], c[1:, 0], c[1:, 1:] = ones, ones, jac
    plus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def _dct(k: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix of order ``k`` (rows: frequencies)."""
    n = torch.arange(k, dtype=torch.float64)
    m = torch.cos(math.pi / k * (n.unsqueeze(0) + 0.5) * n.unsqueeze(1)) * math.sqrt(2.0 / k)
    m[0] /= math.sqrt(2.0)
    return m


def split_size(n: int) -> tuple[int, int, bool]:
    """``n = k * p`` with ``p`` a power of two: ``(k, p, exact)``; ``exact`` when the order-``k``
    factor is a true Hadamard matrix (else it is the DCT of the odd part of ``n``)."""
    if n < 1:
        raise QuantkitError(f"a Hadamard transform needs a positive size, got {n}")
    odd = n
    while odd % 2 == 0:
        odd //= 2
    k = odd
    while n % k == 0 and k <= MAX_FACTOR:
        if k == 1 or _paley_q(k) is not None:
            return k, n // k, True
        k *= 2
    return odd, n // odd, False


@lru_cache(maxsize=64)
def factor_matrix(k: int) -> torch.Tensor:
    """The orthonormal order-``k`` factor (float64): Paley's Hadamard matrix when one exists, else the DCT-II."""
    if k == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    paley = _paley_q(k)
    if paley is None:
        return _dct(k)
    h = _paley(*paley)
    return h / math.sqrt(k)


def sylvester(p: int) -> torch.Tensor:
    """Sylvester's orthonormal Hadamard matrix of order ``p`` (a power of two), float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(p)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal Walsh-Hadamard transform over the last dimension (a power of two):
    ``x @ sylvester(p)``, by ``log2 p`` butterfly passes."""
    p = x.shape[-1]
    if p & (p - 1):
        raise QuantkitError(f"the fast Walsh-Hadamard transform needs a power of two, got {p}")
    shape = x.shape
    y = x.reshape(-1, p)
    h = 1
    while h < p:
        y = y.view(-1, p // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return (y.reshape(shape) * (1.0 / math.sqrt(p))).to(x.dtype)


DENSE_MAX = 128  # largest Sylvester factor applied as one dense product (a 64 KB float32 matrix)


def _modes(n: int, k: int, p: int) -> list[int]:
    """The sizes ``[k, d_1, ..., d_r]`` with ``n = k * d_1 * ... * d_r``, each ``d_i`` a power of
    two up to :data:`DENSE_MAX`: ``kron(A_k, H_p) = kron(A_k, H_d1, ..., H_dr)`` (Sylvester's ``H``
    factors into smaller Sylvester matrices)."""
    sizes = [k]
    while p > 1:
        sizes.append(min(p, DENSE_MAX))
        p //= sizes[-1]
    return sizes


class HadamardTransform:
    """``x -> x @ kron(A_k, H_p)`` over the last dimension (see :func:`split_size`), as one small
    dense product per Kronecker factor (``A_k`` and Sylvester factors of order <= :data:`DENSE_MAX`):
    3 ops for SmolLM2's 1536 = 12 x 128 instead of ~40 butterfly ops, which a decode step of a few
    rows pays as dispatch time.  Each product treats every row alike whatever the number of rows
    (a row gives the same bits alone or in a batch: the quantized KV cache's batching relies on it)."""

    def __init__(self, n: int):
        self.n = n
        self.k, self.p, self.exact = split_size(n)
        self._factor = factor_matrix(self.k).float()
        self.sizes = _modes(n, self.k, self.p)
        self._mats: dict[tuple, list[torch.Tensor]] = {}  # (device, dtype, inverse) -> a matrix per mode

    @property
    def factor(self) -> torch.Tensor:
        """The orthonormal order-``k`` factor ``A``, float32 ``[k, k]`` (the native decode step's)."""
        return self._factor

    def matrix(self) -> torch.Tensor:
        """The dense orthonormal matrix (float64): the reference the fast path is tested against."""
        return torch.kron(factor_matrix(self.k), sylvester(self.p))

    def _matrices(self, device: torch.device, dtype: torch.dtype, inverse: bool) -> list[torch.Tensor]:
        """Per mode, the matrix ``M`` a mode's vector multiplies as ``v @ M`` (``A`` or ``A^T``; ``H = H^T``)."""
        key = (device, dtype, inverse)
        if key not in self._mats:
            a = factor_matrix(self.k)
            mats = [a.t() if inverse else a] + [sylvester(d) for d in self.sizes[1:]]
            self._mats[key] = [m.to(device, dtype) for m in mats]
        return self._mats[key]

    def __call__(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """``x @ M`` (``inverse``: ``x @ M^T``, which undoes it) over the last dimension."""
        if x.shape[-1] != self.n:
            raise ValueError(f"the transform takes {self.n} features, not {x.shape[-1]}")
        work = x.dtype if x.dtype == torch.float64 else torch.float32  # half types: float32 sums
        y = x.to(work).reshape(-1, self.n)
        before = 1
        for size, mat in zip(self.sizes, self._matrices(x.device, work, inverse)):
            after = self.n // (before * size)
            if size > 1 and after == 1:  # the last mode: rows of `size` times M
                y = torch.matmul(y.reshape(-1, size), mat)
            elif size > 1:  # (x kron(.., M, ..))[.., b, ..] = sum_a M[a, b] x[.., a, ..]: M^T on the mode
                y = torch.matmul(mat.t(), y.reshape(-1, size, after))
            before *= size
        return y.reshape(x.shape).to(x.dtype)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """``n`` random signs (float64 +-1) drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).double() * 2 - 1


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """``diag(s) @ kron(A_k, H_p)`` with :func:`random_signs` ``s``: the randomized orthonormal
    rotation of the residual stream, dense (float64 ``[n, n]``; the rotation applies it with the
    fast transform as ``x Q = HadamardTransform(n)(x * s)``)."""
    return random_signs(n, seed).unsqueeze(1) * HadamardTransform(n).matrix()
