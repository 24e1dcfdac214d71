"""tuili's own CPU kernels (cpu_kernels.cpp), built on first use with this machine's compiler and instruction set,
then cached: matrix-vector products over INT4 and INT8 weights for decode-sized batches (int4_gemv, int8_gemv)
and one sequence's whole step through a quantized bf16 Llama-type model (decode_step; runner/cpu_step.py).

On the default model a CPU decode step was ~45 torch ops per layer around torch's packed kernels: the ops'
overhead as large as the matmuls. They need an x86-64 CPU with AVX2 and FMA (AVX-512 BF16 where it has it:
`isa()`) and a C++ compiler; where either is missing, `available()` is False, the reason is logged once, and
torch's kernels and the TorchScript step run as before. TUILI_CPU_KERNELS=0 turns them off (for comparisons);
TUILI_CPU_MARCH=x86-64-v3 builds the AVX2 kernels on an AVX-512 machine (the tests do).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# Rows of x up to which the INT4 kernel and the one-call step run (beyond: torch's kernels and the TorchScript
# step). One: with weights in cache the INT4 kernel takes 39 / 71 / 117 us for 1 / 2 / 4 rows of a 3072 x 576
# layer against torch's 54 / 66 / 97 (its per-row work, a bf16 dot and a scale FMA per 32 weights, is most of
# the loop), and a k = 3 verification (4 rows) took 19.8 ms as one call against 16.6 ms through TorchScript.
GEMV_ROWS = 1
# An AVX2 build (products in integers) raises it (available()): with the weights in cache its INT4 kernel beats
# torch's at every row count measured (3072 x 576: 0.13 / 0.24 / 0.94 / 4.4 / 16.2 ms for 2 / 4 / 16 / 64 / 256
# rows against 0.20 / 0.30 / 1.20 / 5.0 / 19.2), and past 48 rows a bf16 batch goes faster still through the
# weight dequantized to fp32 (int4_dequant) and a float GEMM (3.7 ms at 64 rows, 9.4 at 256): DENSE_ROWS.
GEMV_ROWS_AVX2 = 48
DENSE_ROWS = 1 << 62  # bf16 x with more rows than this: int4_dense (an AVX2 build: GEMV_ROWS_AVX2)
# fp32 x (an fp32 model; the fp32 product runs in both builds): torch's int4 kernel is ~13x slower in fp32 than in
# bf16 (1.02 ms against 77 us for a 1536 x 576 layer, one row), and fp32 batches dequantized the weight per call
# (the reference, then the fp32 GEMM: 1.9 / 7.7 ms for 16 / 128 rows there, 7.5 / 8.9 ms for 576 x 1536); this
# kernel takes 0.53 / 4.4 and 0.45 / 3.7 ms, and still wins at 256 rows. So it runs fp32 batches up to 128 rows
# (the fp32 default model on 2 cores: batch 1 5.3 -> 25.2 tok/s, batch 8 8.3 -> 75.9).
GEMV_ROWS_F32 = 128
# torch's bf16 GEMM on a CPU without native bf16 (no AVX-512 BF16, no AMX) is slow: a 3072 x 576 layer at 64 rows
# 14.7 ms against 4.0 through fp32 (the weight converted per call included), at 16 rows 3.7 against 2.3, at one
# row 0.24 against 0.54 (576 x 1536: 6.1 / 1.5 / 0.11 against 1.2 / 0.67 / 0.42). Batches of more rows than this
# go through fp32 there (dense_linear).
FLOAT_ROWS = 16
# INT8-group layers (GGUF Q8_0, Q6_K): int8_gemv up to this many rows of x, beyond it int8_dense (this AVX2 CPU,
# bf16, ms for 8 / 16 / 32 / 48 / 64 rows, gemv against dense: 3072 x 576 g32 0.31 / 0.58 / 1.20 / 1.91 / 2.54
# against 1.20 / 1.32 / 1.95 / 2.75 / 5.30; g16 0.49 / 0.90 / 1.90 / 2.95 / 3.86 against 1.88 / 1.87 / 2.44 / 3.34
# / 4.15; 576 x 1536 g16 0.24 / 0.46 / 0.94 / 1.40 / 1.81 against 0.73 / 0.83 / 1.04 / 1.28 / 1.46)
INT8_ROWS = 48
SCHEMAS = ("int4_gemv(Tensor x, Tensor w, Tensor so, int group) -> Tensor",
           "int8_gemv(Tensor x, Tensor w, Tensor s) -> Tensor",
           "int4_dequant(Tensor w, Tensor so, int group) -> Tensor",
           "int8_dequant(Tensor w, Tensor s) -> Tensor",
           "bf16_gemv(Tensor x, Tensor w) -> Tensor",
           "decode_step(Tensor x, Tensor cos2, Tensor sin2, Tensor slots, Tensor block_tables, int[] lengths, "
           "Tensor[] tensors, int[] kinds, int[] groups, Tensor final_norm, float eps, int num_heads, "
           "int num_kv_heads, float scale) -> Tensor")  # as TORCH_LIBRARY in cpu_kernels.cpp defines them
_STATE: dict = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _march() -> str:
    return os.environ.get("TUILI_CPU_MARCH", "native")


def _command(out: Path) -> list[str]:
    from torch.utils import cpp_extension
    lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [os.environ.get("CXX", "g++"), "-O3", f"-march={_march()}", "-fopenmp", "-shared", "-fPIC", "-std=c++20",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in cpp_extension.include_paths()), str(SOURCE),
            "-o", str(out), f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{lib}"]


def _build() -> None:
    """Compile (once per source, torch and CPU: the cache key) and load the library: the ops torch.ops.tuili.*"""
    if os.environ.get("TUILI_CPU_KERNELS", "1") == "0":
        raise RuntimeError("turned off by TUILI_CPU_KERNELS=0")
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= set(_cpu_flags().split()):
        raise RuntimeError("they need an x86-64 CPU with AVX2 and FMA")
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags().encode() +
                         _march().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("TUILI_CACHE", Path.home() / ".cache" / "tuili"))
    lib = cache / f"cpu_kernels_{key}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # shown by default (a warning): the first run pauses here, and says why
        logger.warning("building tuili's CPU kernels (once per machine and torch, ~15 s, -march=%s) into %s",
                       _march(), lib)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / lib.name
            result = subprocess.run(_command(out), capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"compiling {SOURCE.name} failed:\n{result.stderr[-2000:]}")
            os.replace(out, lib)  # atomic: a concurrent build leaves one complete file
    torch.ops.load_library(str(lib))


def _define_placeholders() -> None:
    """The ops' schemas without the kernels, so that code naming them (the scripted CPU step) still compiles;
    calling one says why it is missing."""
    lib = torch.library.Library("tuili", "DEF")
    for schema in SCHEMAS:  # (kernel_isa is not among them: nothing scripted calls it)
        lib.define(schema)
        name = schema.split("(")[0]
        lib.impl(name, lambda *args, name=name: _missing(name), "CompositeExplicitAutograd")
    _STATE["placeholders"] = lib  # the registration lives as long as this object


def _missing(name: str):
    raise RuntimeError(f"tuili's CPU kernel {name} is not available here: {_STATE.get('why')}")


def available() -> bool:
    """Whether torch.ops.tuili.{int4_gemv, int8_gemv, decode_step} run here (built on the first call; where they
    cannot be, they exist as placeholders that raise)."""
    if "ok" not in _STATE:
        try:
            _build()
            _STATE["ok"] = True
            if torch.ops.tuili.kernel_isa() == "avx2":
                global GEMV_ROWS, DENSE_ROWS
                GEMV_ROWS = DENSE_ROWS = GEMV_ROWS_AVX2
        except Exception as e:  # noqa: BLE001 - no compiler, no AVX2, turned off: torch's kernels run
            logger.info("tuili's CPU kernels are not used: %s", e)
            _STATE["ok"], _STATE["why"] = False, str(e)
            _define_placeholders()
    return _STATE["ok"]


def why_not() -> str:
    return _STATE.get("why", "")


def isa() -> str:
    """The instruction set the kernels were built for ("avx512_bf16" or "avx2"), "" where they are not."""
    return torch.ops.tuili.kernel_isa() if available() else ""


def pack_int4(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
              group_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Our INT4 layer (quant_matmul's format) in int4_gemv's: (paired nibbles [N, K/2], scales and offsets
    [2, N, K/G] row-major, fp32 for an fp32 layer and bf16 otherwise; symmetric layers get offsets -8 * scale); None
    where the kernel does not take the shape (K a multiple of 64 and of the group, whole groups only)."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if k % 64 or group_size not in (32, 64, 128) or k % group_size or scales.shape[1] != k // group_size:
        return None
    from tuili.ops.quant_matmul import unpack_int4
    q = unpack_int4(qweight).view(n, k // 64, 2, 32)
    paired = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    offsets = -8.0 * scales.float() if offsets is None else offsets
    dtype = torch.float32 if scales.dtype == torch.float32 else torch.bfloat16
    return paired, torch.stack((scales.to(dtype), offsets.to(dtype))).contiguous()


def int4_gemv(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor], group_size: int) -> torch.Tensor:
    """x [M, K] bf16 -> [M, N] bf16, or fp32 -> fp32 (a layer packed from fp32 scales)."""
    available()  # (the ops exist from the first call on)
    return torch.ops.tuili.int4_gemv(x, *packed, group_size)


def int4_dense(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor], group_size: int) -> torch.Tensor:
    """int4_gemv's product for many rows of bf16 x: the weight dequantized to fp32, then dense_linear."""
    available()
    return dense_linear(x, torch.ops.tuili.int4_dequant(*packed, group_size))


def slow_bf16_gemm() -> bool:
    """An x86 CPU without AVX-512 BF16 or AMX: torch's bf16 GEMMs there run several times slower than fp32."""
    if "slow_bf16" not in _STATE:
        flags = set(_cpu_flags().split())
        _STATE["slow_bf16"] = platform.machine() in ("x86_64", "AMD64") and not {"avx512_bf16", "amx_bf16"} & flags
    return _STATE["slow_bf16"]


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 times a bf16 weight [N, K] -> [M, N] bf16 (K a multiple of 16)."""
    available()
    return torch.ops.tuili.bf16_gemv(x, weight)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) in x's dtype: up to FLOAT_ROWS rows of bf16 x and a bf16 weight through tuili's
    kernel (bf16_gemv), more rows through fp32 on a CPU whose bf16 GEMM is slow (weight may be fp32: an INT8
    layer's dequantized copy)."""
    if x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2 \
            and x.shape[0] <= FLOAT_ROWS and x.shape[1] % 16 == 0 and x.is_contiguous() and weight.is_contiguous() \
            and available():
        y = torch.ops.tuili.bf16_gemv(x, weight)
        return y if bias is None else y + bias
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() > FLOAT_ROWS * x.shape[-1] \
            and slow_bf16_gemm():
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight.to(x.dtype), bias)


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16/fp32, qweight int8 [N, K], scales [N] or row-major [N, K / G] (G 16 or 32: GGUF Q6_K / Q8_0)
    in x's dtype -> [M, N] in x's dtype."""
    available()
    return torch.ops.tuili.int8_gemv(x, qweight, scales)


def int8_dense(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8_gemv's product for many rows of x: the weight dequantized to fp32 per call (no float copy is kept) and
    an fp32 GEMM (torch's bf16 GEMM is several times slower on CPUs without AVX-512 BF16: dense_linear)."""
    available()
    return F.linear(x.float(), torch.ops.tuili.int8_dequant(qweight, scales)).to(x.dtype)
