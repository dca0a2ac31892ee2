"""The fp32 few-row matmul of `kernels/skinny_gemm.c`: compiled once per machine, called through ctypes.

Why: on CPU a decode step is a handful of rows times every weight, so its speed is how fast the weights
stream from memory. MKL and oneDNN run 4-16 rows at a fraction of that; the C kernel (AVX-512, OpenMP)
keeps every row's partial sums in registers while each 32-column weight panel streams by once, and
comes close to the one-row GEMV's bandwidth at 8 rows (docs/benchmarks.md).

The system C compiler (`$CC`, else `cc`) builds it the first time, into `$XDG_CACHE_HOME/lmsmith/kernels`
(or `~/.cache/...`), keyed by a hash of the source and flags. Without AVX-512, a compiler, or when
`LMSMITH_SKINNY_GEMM=0`, `load_skinny_kernel()` returns None and the engine uses oneDNN instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("lmsmith.serve")

SOURCE = Path(__file__).with_name("kernels") / "skinny_gemm.c"
FLAGS = ("-O3", "-mavx512f", "-mfma", "-fopenmp", "-shared", "-fPIC")
PANEL = 32


def _cpu_has_avx512f() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f" in flags


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lmsmith" / "kernels"


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"skinny_gemm-{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: several processes may build at once.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE)], check=True, capture_output=True, text=True)
        os.replace(built, target)
    return target


class SkinnyKernel:
    """`linear(x, panels, out_features, bias)` = `F.linear(x, weight, bias)` for fp32 on CPU."""

    name = "skinny-avx512"

    def __init__(self, library: ctypes.CDLL):
        self._function = library.skinny_linear
        self._function.restype = None
        self._function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]

    @staticmethod
    def pack(weight: torch.Tensor) -> torch.Tensor:
        """[out, in] -> panels [ceil(out / 32), in, 32]: panel p, row k holds W[32p .. 32p + 31, k]."""
        out_features, in_features = weight.shape
        panels = -(-out_features // PANEL)
        padded = weight.new_zeros(panels * PANEL, in_features)
        padded[:out_features] = weight
        return padded.view(panels, PANEL, in_features).transpose(1, 2).contiguous()

    def linear(self, x: torch.Tensor, panels: torch.Tensor, out_features: int,
               bias: torch.Tensor | None) -> torch.Tensor:
        x = x.contiguous()
        rows, in_features = x.shape
        out = torch.empty(rows, out_features, dtype=torch.float32)
        self._function(x.data_ptr(), rows, in_features, panels.data_ptr(), out_features,
                       None if bias is None else bias.data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out


@functools.lru_cache(maxsize=1)
def load_skinny_kernel() -> SkinnyKernel | None:
    """The compiled kernel, or None where it cannot run here (it says why in the log)."""
    if os.environ.get("LMSMITH_SKINNY_GEMM", "1") == "0":
        return None
    if not _cpu_has_avx512f():
        log.info("skinny GEMM off: this CPU has no AVX-512")
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("skinny GEMM off: no C compiler (set CC); decode uses oneDNN")
        return None
    try:
        kernel = SkinnyKernel(ctypes.CDLL(str(_build(compiler))))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("skinny GEMM off: building %s failed: %s", SOURCE.name, detail)
        return None
    return kernel
