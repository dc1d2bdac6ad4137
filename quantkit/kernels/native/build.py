"""Build, cache and load quantkit's native CPU kernels (the C sources in the repository's ``kernels/``).

The sources (``qk.h``, ``int4_gemm.c``, ``decode_step.c``, ``matvec.c``, ``hadamard.c``) are compiled
together into one shared object, cached in ``$QUANTKIT_CACHE_DIR`` (default ``~/.cache/quantkit``)
under a hash of every source, the flags and the compiler's version: changing any of them builds anew.

Requirements, checked once by :func:`library` from ``/proc/cpuinfo``: x86-64 Linux with either
AVX-512 (F, BW, VL) and AVX512-BF16 (the ``avx512`` build: bf16 dot products), or AVX2, FMA and
F16C (the ``avx2`` build: float32 FMAs), and a C compiler (``$CC``, else ``cc``); the best set the
CPU has is built (``QUANTKIT_NATIVE_ISA=avx2`` forces the AVX2 one, to test it on an AVX-512
machine).  :func:`portable_library` builds the intrinsic-free ``hadamard.c`` alone, for any CPU
with a C compiler (the online Hadamard transform of rotated models,
:mod:`quantkit.kernels.native.hadamard`).  OpenMP threads come from the ``libgomp``
PyTorch already loaded, ``torch.get_num_threads()`` of them.  ``QUANTKIT_NATIVE=0`` disables the
kernels (PyTorch's ops are used instead).

    >>> lib = library()                 # doctest: +SKIP
    >>> available()                     # False: lib is a NativeUnavailable saying why
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
from pathlib import Path


def _source_dir() -> Path:
    """Where the C sources are: a wheel ships the repository's top-level ``kernels/`` as
    ``quantkit/kernels/csrc/``; a checkout (editable install) reads ``kernels/`` itself."""
    shipped = Path(__file__).parents[1] / "csrc"
    return shipped if shipped.is_dir() else Path(__file__).resolve().parents[3] / "kernels"


SOURCE_DIR = _source_dir()
HEADERS = (SOURCE_DIR / "qk.h", SOURCE_DIR / "hadamard.h")
SOURCES = tuple(SOURCE_DIR / name for name in ("int4_gemm.c", "decode_step.c", "matvec.c", "hadamard.c"))  # one object
PORTABLE_SOURCES = (SOURCE_DIR / "hadamard.c",)
PORTABLE_CFLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fno-strict-aliasing", "-fopenmp")
# instruction set -> (the CPU flags it needs, its compiler flags); the first one the CPU has is built
ISAS = {
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "f16c", "fma"),
               PORTABLE_CFLAGS + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mf16c", "-mfma")),
    "avx2": (("avx2", "f16c", "fma"), PORTABLE_CFLAGS + ("-mavx2", "-mf16c", "-mfma")),
}
CFLAGS = ISAS["avx512"][1]


class NativeUnavailable(RuntimeError):
    """Why the kernels cannot be used here (reported once, then PyTorch's ops are used)."""


def _cpu_flags() -> list[str] | str:
    """The CPU's flags (read at run time from ``/proc/cpuinfo``), or why they cannot be read."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs x86-64 Linux, this is {sys.platform}/{platform.machine()}"
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError as e:
        return f"cannot read /proc/cpuinfo: {e}"


def choose_isa(flags: list[str], forced: str = "") -> str | None:
    """The instruction set of :data:`ISAS` to build for a CPU with ``flags`` (``forced``: only that
    one), or None if it has none of them."""
    names = [forced] if forced in ISAS else list(ISAS)
    return next((n for n in names if all(f in flags for f in ISAS[n][0])), None)


def _isa_or_why() -> tuple[list[str], str | None]:
    """The instruction sets of :data:`ISAS` this CPU runs, best first (``QUANTKIT_NATIVE_ISA``: only
    that one), or why none."""
    flags = _cpu_flags()
    if isinstance(flags, str):
        return [], flags
    forced = os.environ.get("QUANTKIT_NATIVE_ISA", "").strip().lower()
    if forced and forced not in ISAS:
        return [], f"QUANTKIT_NATIVE_ISA={forced!r} is not one of {', '.join(ISAS)}"
    names = [n for n in ([forced] if forced else ISAS) if choose_isa(flags, n) == n]
    if not names:
        wanted = " or ".join("+".join(ISAS[n][0]) for n in ([forced] if forced else ISAS))
        return [], f"the CPU lacks {wanted}"
    return names, None


def isa() -> str | None:
    """The instruction set the kernels are built for here (``"avx512"``/``"avx2"``), None if they cannot run."""
    lib = library()
    return None if isinstance(lib, Exception) else lib.qk_isa


def cache_key(flags: tuple[str, ...], compiler_version: list[str], sources: tuple[Path, ...] | None = None) -> str:
    """16 hex digits over every source file (name and bytes; default :data:`SOURCES`), the flags and the compiler."""
    h = hashlib.sha256()
    for path in (*HEADERS, *(SOURCES if sources is None else sources)):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(repr((flags, compiler_version)).encode())
    return h.hexdigest()[:16]


def _build(cache: Path, sources: tuple[Path, ...] | None = None, cflags: tuple[str, ...] = CFLAGS) -> Path:
    """Compile ``sources`` (default :data:`SOURCES`) into ``cache`` (once per sources, flags and
    compiler) and return the shared object; without OpenMP if the compiler has none (the kernels
    then run on one thread)."""
    sources = SOURCES if sources is None else sources
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise NativeUnavailable("no C compiler found (set $CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout.splitlines()[:1]
    error = ""
    for flags in (cflags, tuple(f for f in cflags if f != "-fopenmp")):
        target = cache / f"quantkit-native-{cache_key(flags, version, sources)}.so"
        if target.is_file():
            return target
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            cmd = [cc, *flags, "-I", str(SOURCE_DIR), *map(str, sources), "-o", tmp, "-lm"]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent builders agree on the result
                return target
            error = (r.stderr.strip().splitlines() or ["?"])[-1][:300]
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise NativeUnavailable(f"{cc} failed: {error}")


class Int4WeightStruct(ctypes.Structure):
    """``qk_int4_weight`` in qk.h: one packed weight's pointers and sizes, converted once."""

    _fields_ = [("w", ctypes.c_void_p), ("s16", ctypes.c_void_p), ("z", ctypes.c_void_p), ("perm", ctypes.c_void_p),
                ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("K8", ctypes.c_int64), ("gs", ctypes.c_int64),
                ("zconst", ctypes.c_float)]


class LayerStruct(ctypes.Structure):
    """``qk_layer`` in qk.h: one block's weights, biases, norms, KV cache and what other families add."""

    _fields_ = [(n, ctypes.POINTER(Int4WeightStruct)) for n in ("q", "k", "v", "o", "gate", "up", "down")] + [
        ("bq", ctypes.c_void_p), ("bk", ctypes.c_void_p), ("bv", ctypes.c_void_p),
        ("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("eps1", ctypes.c_float), ("eps2", ctypes.c_float),
        ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p), ("had", ctypes.c_void_p), ("had_k", ctypes.c_int64),
        ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p), ("eps_q", ctypes.c_float), ("eps_k", ctypes.c_float),
        ("post_attn_norm", ctypes.c_void_p), ("post_mlp_norm", ctypes.c_void_p), ("eps3", ctypes.c_float),
        ("eps4", ctypes.c_float), ("rope_cos", ctypes.c_void_p), ("rope_sin", ctypes.c_void_p),
        ("window", ctypes.c_int64), ("act", ctypes.c_int64), ("n_experts", ctypes.c_int64), ("top_k", ctypes.c_int64),
        ("norm_topk", ctypes.c_int64), ("router", ctypes.c_void_p), ("experts", ctypes.c_void_p),
        ("shared", ctypes.c_void_p), ("shared_gate", ctypes.c_void_p)]


class DecodeDimsStruct(ctypes.Structure):
    """``qk_decode_dims`` in qk.h: the sizes every block of a model shares."""

    _fields_ = [(n, ctypes.c_int64) for n in ("d", "nh", "nkv", "hd", "inter", "max_len")] + [
        ("scale", ctypes.c_float), ("attn_cap", ctypes.c_float), ("max_experts", ctypes.c_int64)]


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The C signatures of qk.h, so ctypes converts every argument."""
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.qk_int4_mm.restype = ctypes.c_int
    lib.qk_int4_mm.argtypes = [ctypes.POINTER(Int4WeightStruct), p, i32, p, i64, p, i32]
    lib.qk_int4_dequant.restype = None
    lib.qk_int4_dequant.argtypes = [p, p, p, f32, i64, i64, i64, i64, i64, p, i32, i32]
    lib.qk_bf16_matvec.restype = None
    lib.qk_bf16_matvec.argtypes = [p, p, p, i64, i64, i32]
    lib.qk_decode_layers.restype = ctypes.c_int
    lib.qk_decode_layers.argtypes = [p, i32, ctypes.POINTER(DecodeDimsStruct), p, i64, p, p, i32]
    return _declare_portable(lib)


def _declare_portable(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The C signatures of hadamard.h."""
    lib.qk_hadamard_rows.restype = ctypes.c_int
    lib.qk_hadamard_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                     ctypes.c_int]
    return lib


@functools.lru_cache(maxsize=1)
def library():
    """The loaded kernel library, or a :class:`NativeUnavailable` saying why not (built once per process)."""
    if os.environ.get("QUANTKIT_NATIVE", "1").strip() == "0":
        return NativeUnavailable("disabled by QUANTKIT_NATIVE=0")
    names, why = _isa_or_why()
    if why:
        return NativeUnavailable(why)
    errors = []
    for name in names:  # a compiler too old for -mavx512bf16 still builds the AVX2 kernels
        try:
            lib = _declare(ctypes.CDLL(str(_build(_cache_dir(), SOURCES, ISAS[name][1]))))
            lib.qk_isa = name
            return lib
        except (NativeUnavailable, OSError, subprocess.SubprocessError) as e:
            errors.append(f"{name}: {e}" if isinstance(e, NativeUnavailable) else f"{name}: cannot build or load the kernel: {e}")
    return NativeUnavailable("; ".join(errors))


def _cache_dir() -> Path:
    return Path(os.environ.get("QUANTKIT_CACHE_DIR") or Path.home() / ".cache" / "quantkit")


@functools.lru_cache(maxsize=1)
def portable_library():
    """The loaded portable library (``hadamard.c``, no CPU requirement beyond a C compiler), or
    a :class:`NativeUnavailable` saying why not (built once per process)."""
    if os.environ.get("QUANTKIT_NATIVE", "1").strip() == "0":
        return NativeUnavailable("disabled by QUANTKIT_NATIVE=0")
    try:
        return _declare_portable(ctypes.CDLL(str(_build(_cache_dir(), PORTABLE_SOURCES, PORTABLE_CFLAGS))))
    except (NativeUnavailable, OSError, subprocess.SubprocessError) as e:
        return e if isinstance(e, NativeUnavailable) else NativeUnavailable(f"cannot build or load the kernel: {e}")


def available() -> bool:
    """Whether :func:`library` loaded (this CPU, a compiler, not disabled)."""
    return not isinstance(library(), Exception)


def ptr(t) -> int | None:
    """A tensor's data pointer for a C call, None for None."""
    return None if t is None else t.data_ptr()
