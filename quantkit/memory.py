"""Process memory: peak RSS, and keeping glibc from hoarding freed tensor memory.

Compression allocates and frees many large, differently sized tensors (block activations,
attention scores, Hessians, GPTQ's working copies).  glibc raises its mmap threshold
dynamically up to 32 MiB after large blocks are freed, after which such tensors come from the
heap, whose holes are rarely returned to the OS: resident memory creeps up block after block
(measured: quantizing SmolLM2-135M with GPTQ peaked at 1.55 GB with glibc's default and
1.28 GB with a fixed 64 KiB threshold).  :func:`return_large_frees_to_os` fixes the threshold,
so every tensor above it is its own mapping and goes back to the OS when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from pathlib import Path

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
_done = False


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: ``VmHWM`` where Linux has it (``ru_maxrss``
    would report the peak of the process that started this one: it survives fork and exec)."""
    status = Path("/proc/self/status")
    if status.is_file():  # Linux
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS (no /proc)
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_large_frees_to_os(threshold: int = 1 << 16) -> bool:
    """Serve allocations of ``threshold`` bytes and more by mmap from now on (glibc only; a
    no-op elsewhere).  Returns whether the setting took effect."""
    global _done
    if _done:
        return True
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    _done = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    if _done and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)  # and give back what the heap holds free now
    return _done


def release_freed_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the OS (glibc ``malloc_trim``):
    after a burst of short-lived allocations, such as tokenizing a long text, which otherwise
    stay resident (measured: +150 MB kept after tokenizing the 2.3 MB C4 sample, +39 MB after this)."""
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# commands that never run a Triton kernel on a machine without CUDA (compression and conversion)
_NO_TRITON_COMMANDS = frozenset({"quantize", "prune", "lowrank", "run", "distill", "export"})


def keep_triton_unloaded(argv: list[str]) -> bool:
    """In a ``quantkit`` process running one of the compression commands on a machine without
    CUDA, make ``import triton`` fail from now on, and return whether it did.

    Triton is only used for CUDA kernels, but ``transformers`` imports ``torch._dynamo``, which
    imports Triton when it is installed: ~70 MB resident (libtriton.so alone is 66 MB) for nothing
    on a CPU.  Called by the console script only (never inside another program or the tests), and
    a no-op when Triton is already loaded, ``TRITON_INTERPRET`` is set, or CUDA is present."""
    import os

    if not argv or argv[0] not in _NO_TRITON_COMMANDS or "triton" in sys.modules or os.environ.get("TRITON_INTERPRET"):
        return False
    import torch

    if torch.cuda.is_available():
        return False
    sys.modules["triton"] = None  # the import system's own "known missing" marker: ImportError on import
    return True


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is no /proc)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None  # unreadable /proc/meminfo: the size is unknown
    return None  # no MemAvailable line (old kernels)
