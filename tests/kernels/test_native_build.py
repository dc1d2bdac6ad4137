"""Building quantkit's native kernels (quantkit/kernels/native/build.py): one shared object from every
C source in kernels/, cached under a hash of all of them, and the fallbacks when it cannot be built."""

import shutil

import pytest
import torch

from quantkit.core.quant import dequantize
from quantkit.kernels import cpu as cpu_kernels
from quantkit.kernels.layout import group_map
from quantkit.kernels.native import build, int4

NEEDS_KERNEL = pytest.mark.skipif(not build.available(), reason=f"native kernels unavailable: {build.library()}")
ON_DISK = sorted(p.name for p in build.SOURCE_DIR.iterdir() if p.suffix in (".c", ".h"))


def _format(n, k, gs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g)
    s = (torch.rand(n, k // gs, generator=g) * 0.1 + 0.01).half().float()
    return q, s, torch.full((n, k // gs), 8.0)


def _sources_in(monkeypatch, folder):
    """Point the build at a copy of kernels/ in ``folder`` (so a test may edit it)."""
    shutil.copytree(build.SOURCE_DIR, folder)
    monkeypatch.setattr(build, "SOURCE_DIR", folder)
    monkeypatch.setattr(build, "HEADERS", tuple(folder / p.name for p in build.HEADERS))
    monkeypatch.setattr(build, "SOURCES", tuple(folder / p.name for p in build.SOURCES))
    monkeypatch.setattr(build, "PORTABLE_SOURCES", tuple(folder / p.name for p in build.PORTABLE_SOURCES))


def test_every_source_in_the_folder_is_compiled_or_included():
    assert sorted(p.name for p in (*build.HEADERS, *build.SOURCES)) == ON_DISK
    assert all(any(f'#include "{h.name}"' in p.read_text() for h in build.HEADERS) for p in build.SOURCES)
    assert set(build.PORTABLE_SOURCES) <= set(build.SOURCES)
    assert all("immintrin" not in p.read_text() for p in build.PORTABLE_SOURCES)  # any CPU builds them


@pytest.mark.parametrize("name", ON_DISK)
def test_changing_any_source_changes_the_cache_key(name, monkeypatch, tmp_path):
    _sources_in(monkeypatch, tmp_path / "kernels")
    before = build.cache_key(build.CFLAGS, ["cc 1"])
    assert build.cache_key(build.CFLAGS, ["cc 1"]) == before  # deterministic
    with open(tmp_path / "kernels" / name, "a") as f:
        f.write("/* edited */\n")
    assert build.cache_key(build.CFLAGS, ["cc 1"]) != before


def test_flags_and_compiler_change_the_cache_key():
    key = build.cache_key(build.CFLAGS, ["cc 1"])
    assert build.cache_key(build.CFLAGS[:-1], ["cc 1"]) != key
    assert build.cache_key(build.CFLAGS, ["cc 2"]) != key


@NEEDS_KERNEL
def test_an_edited_source_is_rebuilt_and_an_unchanged_one_is_not(monkeypatch, tmp_path):
    _sources_in(monkeypatch, tmp_path / "kernels")
    cache = tmp_path / "cache"
    first = build._build(cache)
    assert build._build(cache) == first and len(list(cache.glob("*.so"))) == 1  # cached
    with open(build.SOURCE_DIR / "matvec.c", "a") as f:
        f.write("/* edited */\n")
    second = build._build(cache)
    assert second != first and second.is_file() and len(list(cache.glob("*.so"))) == 2


@NEEDS_KERNEL
def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("QUANTKIT_NATIVE", "0")
    build.library.cache_clear()
    try:
        assert not build.available() and "QUANTKIT_NATIVE" in str(build.library())
        q, s, z = _format(16, 64, 32)
        assert isinstance(cpu_kernels.cpu_int4_weight(q, s, z, None, 32), cpu_kernels.CpuInt4Weight)  # PyTorch's op
    finally:
        monkeypatch.delenv("QUANTKIT_NATIVE")
        build.library.cache_clear()
    assert build.available()


def _rebuild_with(monkeypatch, tmp_path, cc: str):
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("QUANTKIT_CACHE_DIR", str(tmp_path / "cache"))
    build.library.cache_clear()


@NEEDS_KERNEL
def test_build_falls_back_to_one_thread_without_openmp_and_to_torch_without_a_compiler(monkeypatch, tmp_path):
    gcc = shutil.which("gcc") or shutil.which("cc")
    no_omp = tmp_path / "cc-no-openmp"
    no_omp.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {gcc} "$@"\n')
    no_omp.chmod(0o755)
    q, s, z = _format(16, 64, 32)
    x = torch.randn(2, 64)
    try:
        _rebuild_with(monkeypatch, tmp_path, str(no_omp))
        assert build.available()
        y = int4.int4_matmul(x, int4.int4_weight(q, s, z, None, 32))
        ref = x.to(torch.bfloat16).float() @ dequantize(q, s, z, group_map(None, 32, 64)).t()
        assert float((y - ref).norm() / ref.norm()) < 1e-5
        _rebuild_with(monkeypatch, tmp_path / "other", "false")
        assert "failed" in str(build.library())
        assert isinstance(cpu_kernels.cpu_int4_weight(q, s, z, None, 32), cpu_kernels.CpuInt4Weight)
    finally:
        monkeypatch.undo()
        build.library.cache_clear()
    assert build.available()


def test_the_best_instruction_set_the_cpu_has_is_chosen():
    avx2 = ["avx2", "fma", "f16c"]
    avx512 = avx2 + ["avx512f", "avx512bw", "avx512vl", "avx512_bf16"]
    assert build.choose_isa(avx512) == "avx512" and build.choose_isa(avx2) == "avx2"
    assert build.choose_isa(avx512, "avx2") == "avx2" and build.choose_isa(avx2, "avx512") is None
    assert build.choose_isa(["avx2", "fma"]) is None  # no F16C: no fp16 scales


def test_an_unknown_forced_instruction_set_says_why(monkeypatch):
    monkeypatch.setenv("QUANTKIT_NATIVE_ISA", "sse2")
    build.library.cache_clear()
    try:
        assert not build.available() and "QUANTKIT_NATIVE_ISA" in str(build.library())
    finally:
        monkeypatch.undo()
        build.library.cache_clear()


HAS_AVX2 = not isinstance(build._cpu_flags(), str) and build.choose_isa(build._cpu_flags(), "avx2") == "avx2"


@pytest.mark.skipif(not HAS_AVX2 or not shutil.which("cc"), reason="needs a CPU with AVX2, FMA, F16C and a C compiler")
def test_the_avx2_build_matches_the_reference_and_backs_up_a_failed_avx512_build(monkeypatch, tmp_path):
    """The AVX2 kernels (forced, as on an AVX-512 machine) against the dequantized reference: rows
    past a multiple of 16, group-wise asymmetric zeros, several activation rows, bf16 in and out, a
    bias; and a compiler that cannot build the AVX-512 set leaves the AVX2 one in use."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    no_bf16 = tmp_path / "cc-no-avx512bf16"
    no_bf16.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -mavx512bf16 ] && exit 1; done\nexec {gcc} "$@"\n')
    no_bf16.chmod(0o755)
    g = torch.Generator().manual_seed(0)
    try:
        monkeypatch.setenv("QUANTKIT_NATIVE_ISA", "avx2")
        monkeypatch.setenv("QUANTKIT_CACHE_DIR", str(tmp_path / "cache"))
        build.library.cache_clear()
        assert build.isa() == "avx2"
        for n, k, gs, m in ((37, 128, 32, 1), (16, 96, 96, 3), (50, 256, 64, 5)):
            q = torch.randint(0, 16, (n, k), generator=g)
            s = (torch.rand(n, k // gs, generator=g) * 0.1 + 0.01).half().float()
            z = torch.randint(0, 16, (n, k // gs), generator=g).float()
            w, bias = int4.int4_weight(q, s, z, None, gs), torch.randn(n, generator=g)
            ref_w = dequantize(q, s, z, group_map(None, gs, k))
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(m, k, generator=g).to(dtype)
                y = int4.int4_matmul(x, w, bias)
                ref = x.to(torch.bfloat16).float() @ ref_w.t() + bias
                assert y.dtype == dtype and float((y.float() - ref).norm() / ref.norm()) < (1e-5 if dtype == torch.float32 else 1e-2)
        monkeypatch.delenv("QUANTKIT_NATIVE_ISA")
        monkeypatch.setenv("CC", str(no_bf16))
        monkeypatch.setattr(build, "_cpu_flags", lambda: build.ISAS["avx512"][0] + build.ISAS["avx2"][0])
        build.library.cache_clear()
        assert build.isa() == "avx2"  # the AVX-512 build failed; the AVX2 one runs
    finally:
        monkeypatch.undo()
        build.library.cache_clear()
