"""quantkit's own CPU int4 kernel (``cpu_int4.c``), built on first use and called through ctypes.

PyTorch's ``_weight_int4pack_mm_for_cpu`` unpacks nibbles at ~8 GB/s per core here, a third of
what one core can stream; this kernel turns a nibble into a bf16 weight with one ternary-logic op
(``0x4300 | q`` is bf16 ``128 + q``) and multiplies with ``vdpbf16ps`` (see the C file for the
layout and the algebra), so decode is bound by memory, not by unpacking.  It also takes float32
activations directly (no cast ops around each linear), adds the bias, writes outputs of any width
without padding, and dequantizes exactly for the many-row float32 path (:mod:`quantkit.kernels.cpu`).

Requirements, checked once by :func:`library`: x86-64 Linux with AVX-512 (F, BW, VL) and
AVX512-BF16, and a C compiler (``$CC``, else ``cc``).  The shared object is cached in
``$QUANTKIT_CACHE_DIR`` (default ``~/.cache/quantkit``) under a hash of the source and flags.
OpenMP threads come from the ``libgomp`` PyTorch already loaded, ``torch.get_num_threads()`` of
them.  ``QUANTKIT_NATIVE=0`` disables the kernel (PyTorch's op is used instead).

    >>> w = int4_weight(q, scales, zeros, g_idx=None, group_size=64)   # doctest: +SKIP
    >>> y = int4_matmul(x, w)                                           # x [..., K] -> [..., N]
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F



def _source_dir() -> Path:
    """Where the C sources are: a wheel ships the repository's top-level ``kernels/`` as
    ``quantkit/kernels/csrc/``; a checkout (editable install) reads ``kernels/`` itself."""
    shipped = Path(__file__).with_name("csrc")
    return shipped if shipped.is_dir() else Path(__file__).resolve().parents[2] / "kernels"


SOURCE = _source_dir() / "cpu_int4.c"
CFLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fno-strict-aliasing", "-mavx512f", "-mavx512bw", "-mavx512vl",
          "-mavx512bf16", "-mf16c", "-mfma", "-fopenmp")
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "f16c", "fma")


class NativeUnavailable(RuntimeError):
    """Why the kernel cannot be used here (reported once, then PyTorch's op is used)."""


def _cpu_supported() -> str | None:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs x86-64 Linux, this is {sys.platform}/{platform.machine()}"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError as e:
        return f"cannot read /proc/cpuinfo: {e}"
    missing = [f for f in _CPU_FLAGS if f not in flags]
    return f"the CPU lacks {', '.join(missing)}" if missing else None


def _build(cache: Path) -> Path:
    """Compile ``cpu_int4.c`` into ``cache`` (once per source, flags and compiler) and return it;
    without OpenMP if the compiler has none (the kernel then runs on one thread)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise NativeUnavailable("no C compiler found (set $CC)")
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout.splitlines()[:1]
    error = ""
    for flags in (CFLAGS, tuple(f for f in CFLAGS if f != "-fopenmp")):
        key = hashlib.sha256(src + repr((flags, version)).encode()).hexdigest()[:16]
        target = cache / f"cpu_int4-{key}.so"
        if target.is_file():
            return target
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            r = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, check=False)
            if r.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent builders agree on the result
                return target
            error = (r.stderr.strip().splitlines() or ["?"])[-1][:300]
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise NativeUnavailable(f"{cc} failed: {error}")


@functools.lru_cache(maxsize=1)
def library():
    """The loaded kernel library, or a :class:`NativeUnavailable` saying why not (built once per process)."""
    if os.environ.get("QUANTKIT_NATIVE", "1").strip() == "0":
        return NativeUnavailable("disabled by QUANTKIT_NATIVE=0")
    why = _cpu_supported()
    if why:
        return NativeUnavailable(why)
    try:
        cache = Path(os.environ.get("QUANTKIT_CACHE_DIR") or Path.home() / ".cache" / "quantkit")
        lib = ctypes.CDLL(str(_build(cache)))
    except (NativeUnavailable, OSError, subprocess.SubprocessError) as e:
        return e if isinstance(e, NativeUnavailable) else NativeUnavailable(f"cannot build or load the kernel: {e}")
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.qk_int4_mm.restype = ctypes.c_int
    lib.qk_int4_mm.argtypes = [ctypes.POINTER(_Desc), p, i32, p, i64, p, i32]
    lib.qk_int4_dequant.restype = None
    lib.qk_int4_dequant.argtypes = [p, p, p, f32, i64, i64, i64, i64, i64, p, i32, i32]
    lib.qk_bf16_matvec.restype = None
    lib.qk_bf16_matvec.argtypes = [p, p, p, i64, i64, i32]
    lib.qk_decode_layers.restype = ctypes.c_int
    lib.qk_decode_layers.argtypes = [p, i32, p, i64, i64, i64, i64, i64, i64, i64, p, p, f32, i32]
    return lib


def available() -> bool:
    return not isinstance(library(), Exception)


# ---- layout --------------------------------------------------------------------------------
class _Desc(ctypes.Structure):
    """``qk_int4_weight`` in cpu_int4.c: the weight's pointers and sizes, converted once."""

    _fields_ = [("w", ctypes.c_void_p), ("s16", ctypes.c_void_p), ("z", ctypes.c_void_p), ("perm", ctypes.c_void_p),
                ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("K8", ctypes.c_int64), ("gs", ctypes.c_int64),
                ("zconst", ctypes.c_float)]


@dataclass
class NativeInt4Weight:
    """Packed for ``cpu_int4.c`` (see there): codes, fp16 scales and (asymmetric) uint8 zeros."""

    w: torch.Tensor  # uint8 [N16/16, K8/8, 64]
    s16: torch.Tensor  # float16 [N16/16, G, 16]
    z: torch.Tensor | None  # uint8 [N16/16, G, 16]; None: every zero is zconst
    zconst: float
    in_features: int  # K
    k_padded: int  # K8
    group_size: int  # in the layout (K8 when the row is one group)
    out_features: int  # N
    perm: torch.Tensor | None  # int64 [K]: act-order column order (x is gathered by it)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w, self.s16, self.z, self.perm) if t is not None)

    def __post_init__(self):
        # raw pointers into the tensors above, for the C call: rebuilt on copy, never pickled
        self.desc = ctypes.pointer(_Desc(self.w.data_ptr(), self.s16.data_ptr(), _ptr(self.z), _ptr(self.perm),
                                         self.out_features, self.in_features, self.k_padded, self.group_size,
                                         self.zconst))

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "desc"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__post_init__()


def int4_weight(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, perm: torch.Tensor | None,
                group_size: int) -> NativeInt4Weight | None:
    """Codes ``q [N, K]`` (< 16, columns already in ``perm`` order), float ``scales``/``zeros
    [N, G]`` (scales are stored as fp16, as checkpoints hold them) -> the layout, or None if the
    kernel is unavailable or the format does not fit (a group size that is not a multiple of 8
    on a row of several groups, non-integer zeros)."""
    if not available():
        return None
    n, k = q.shape
    n_groups = scales.shape[1]
    if n_groups == 1:
        k8, gs = -(-k // 8) * 8, -(-k // 8) * 8
    elif group_size % 8 == 0 and group_size * n_groups == k:
        k8, gs = k, group_size
    else:
        return None
    if q.numel() and int(q.max()) > 15:
        return None
    zeros = zeros.float()
    if not torch.equal(zeros, zeros.round()) or (zeros.numel() and (zeros.min() < 0 or zeros.max() > 255)):
        return None
    n16 = -(-n // 16) * 16
    codes = F.pad(q.to(torch.uint8), (0, k8 - k, 0, n16 - n))  # [N16, K8], one byte per code
    c = codes.reshape(n16 // 16, 16, k8 // 8, 4, 2)  # [NB, r, chunk, t, j]: column k0 + 2t + j
    lo = c[:, :, :, 0] | (c[:, :, :, 1] << 4)  # nibbles t = 0, 1 of word (r, j): its low byte
    hi = c[:, :, :, 2] | (c[:, :, :, 3] << 4)  # nibbles t = 2, 3: its high byte (little-endian)
    w = torch.stack([lo, hi], dim=-1).permute(0, 2, 1, 3, 4).contiguous()  # [NB, chunk, r, j, byte] = 64 bytes a chunk

    def by_block(t: torch.Tensor) -> torch.Tensor:  # [N, G] -> [NB, G, 16], padded rows 0
        return F.pad(t, (0, 0, 0, n16 - n)).reshape(n16 // 16, 16, n_groups).transpose(1, 2).contiguous()

    s16 = by_block(scales.float()).to(torch.float16)
    z0 = float(zeros.flatten()[0]) if zeros.numel() else 0.0
    uniform = bool((zeros == z0).all())
    z = None if uniform else by_block(zeros).to(torch.uint8)
    return NativeInt4Weight(w.reshape(n16 // 16, k8 // 8, 64), s16, z, z0 if uniform else 0.0, k, k8, gs, n,
                            None if perm is None else perm.long().contiguous())


# ---- compute ---------------------------------------------------------------------------------
def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def int4_matmul(x: torch.Tensor, w: NativeInt4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K]`` (float32 or bf16) ``-> [..., N]`` in ``x.dtype``: bf16 products, float32
    sums, ``+ bias`` (float32 ``[N]``) if given.  One ctypes call, no other op (under
    ``torch.compile``: the ``quantkit::int4_mm`` custom op, so the graph does not break)."""
    if torch.compiler.is_compiling():
        return torch.ops.quantkit.int4_mm(x, w.w, w.s16, w.z, w.perm, bias, w.in_features, w.k_padded, w.group_size,
                                          w.out_features, w.zconst)
    if not x.is_contiguous():
        x = x.contiguous()
    m = x.numel() // w.in_features
    y = torch.empty(*x.shape[:-1], w.out_features, dtype=x.dtype)
    if m == 0:
        return y
    rc = library().qk_int4_mm(w.desc, x.data_ptr(), x.dtype == torch.bfloat16, y.data_ptr(), m,
                              None if bias is None else bias.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError("quantkit int4 kernel: out of memory for its activation buffer")
    return y


def dequantize_rows(w: NativeInt4Weight, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``start:stop`` of the weight (``start`` a multiple of 16) as ``dtype`` (float32 or
    bf16) ``[stop - start, K]``, columns in the layout's (``perm``) order; float32 values equal
    the reference's ``(q - z) * s``."""
    if torch.compiler.is_compiling():
        return torch.ops.quantkit.int4_dequant(w.w, w.s16, w.z, w.in_features, w.k_padded, w.group_size, w.zconst,
                                               start, stop, dtype)
    out = torch.empty(stop - start, w.in_features, dtype=dtype)
    library().qk_int4_dequant(w.w.data_ptr(), w.s16.data_ptr(), _ptr(w.z), w.zconst, w.in_features, w.k_padded,
                              w.group_size, start, stop, out.data_ptr(), dtype == torch.bfloat16, torch.get_num_threads())
    return out


# ---- torch.compile: the same calls as custom ops (opaque to the compiler, no graph break) -----
@torch.library.custom_op("quantkit::int4_mm", mutates_args=())
def _int4_mm_op(x: torch.Tensor, w: torch.Tensor, s16: torch.Tensor, z: torch.Tensor | None, perm: torch.Tensor | None,
                bias: torch.Tensor | None, in_features: int, k_padded: int, group_size: int, out_features: int,
                zconst: float) -> torch.Tensor:
    return int4_matmul(x, NativeInt4Weight(w, s16, z, zconst, in_features, k_padded, group_size, out_features, perm), bias)


@_int4_mm_op.register_fake
def _(x, w, s16, z, perm, bias, in_features, k_padded, group_size, out_features, zconst):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("quantkit::int4_dequant", mutates_args=())
def _int4_dequant_op(w: torch.Tensor, s16: torch.Tensor, z: torch.Tensor | None, in_features: int, k_padded: int,
                     group_size: int, zconst: float, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    n = s16.shape[0] * 16
    return dequantize_rows(NativeInt4Weight(w, s16, z, zconst, in_features, k_padded, group_size, n, None), start, stop, dtype)


@_int4_dequant_op.register_fake
def _(w, s16, z, in_features, k_padded, group_size, zconst, start, stop, dtype):
    return w.new_empty(stop - start, in_features, dtype=dtype)


# ---- a whole decode step of Llama-style blocks (qk_decode_layers) ---------------------------
class _Layer(ctypes.Structure):
    """``qk_layer`` in cpu_int4.c."""

    _fields_ = [(n, ctypes.POINTER(_Desc)) for n in ("q", "k", "v", "o", "gate", "up", "down")] + [
        ("bq", ctypes.c_void_p), ("bk", ctypes.c_void_p), ("bv", ctypes.c_void_p),
        ("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("eps1", ctypes.c_float), ("eps2", ctypes.c_float),
        ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


@dataclass
class DecodeLayer:
    """One block for :class:`DecodePlan`: its seven int4 weights, q/k/v biases (float32 or None),
    RMSNorm weights (float32), epsilons and its float32 KV cache ``[n_kv, max_len, head_dim]``."""

    weights: tuple[NativeInt4Weight, ...]  # q, k, v, o, gate, up, down
    biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
    norm1: torch.Tensor
    norm2: torch.Tensor
    eps1: float
    eps2: float
    k_cache: torch.Tensor
    v_cache: torch.Tensor


class DecodePlan:
    """Every block of a model for ``qk_decode_layers``: one ctypes call per decoded token.
    Holds references to every tensor it points into."""

    def __init__(self, layers: list[DecodeLayer], n_heads: int, n_kv: int, head_dim: int, intermediate: int,
                 max_len: int, scale: float):
        self.layers, self.n_heads, self.n_kv, self.head_dim = layers, n_heads, n_kv, head_dim
        self.intermediate, self.max_len, self.scale = intermediate, max_len, scale
        self._structs = (_Layer * len(layers))()
        for st, lay in zip(self._structs, layers):
            for name, w in zip(("q", "k", "v", "o", "gate", "up", "down"), lay.weights):
                setattr(st, name, w.desc)
            st.bq, st.bk, st.bv = (_ptr(b) for b in lay.biases)
            st.norm1, st.norm2 = lay.norm1.data_ptr(), lay.norm2.data_ptr()
            st.eps1, st.eps2 = lay.eps1, lay.eps2
            st.k_cache, st.v_cache = lay.k_cache.data_ptr(), lay.v_cache.data_ptr()

    def step(self, x: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` float32 ``[hidden]`` (the embedding of the token at ``pos``), updated in place to
        the last block's output; ``cos``/``sin`` float32 ``[head_dim]`` for ``pos``."""
        rc = library().qk_decode_layers(ctypes.addressof(self._structs), len(self.layers), x.data_ptr(), x.numel(),
                                        self.n_heads, self.n_kv, self.head_dim, self.intermediate, pos, self.max_len,
                                        cos.data_ptr(), sin.data_ptr(), self.scale, torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"quantkit decode step failed ({rc})")
        return x


def bf16_matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x [K]`` -> ``w [N, K] (bf16, contiguous) @ x`` as float32 ``[N]``: x rounded to bf16, float32
    sums (what ``F.linear`` computes in bf16, without its bf16 rounding of the output)."""
    xb = x.to(torch.bfloat16).contiguous()
    y = torch.empty(w.shape[0], dtype=torch.float32)
    library().qk_bf16_matvec(w.data_ptr(), xb.data_ptr(), y.data_ptr(), w.shape[0], w.shape[1], torch.get_num_threads())
    return y
