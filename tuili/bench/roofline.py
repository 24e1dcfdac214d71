"""The hardware ceilings (measured at the start of every benchmark) and the work of a step (bytes, FLOPs)."""
from __future__ import annotations

import os
import platform
import subprocess
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, nbytes: int = 2**30, repeats: int = 10) -> float:
    """Device copy bandwidth in bytes/s (read + write counted): the ceiling for memory-bound decode."""
    if device.type == "cpu":
        nbytes, repeats = 2**28, 5
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - start)


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int = 10, n: int | None = None) -> float:
    """Dense matmul FLOP/s (8192^3 on GPU, 1024^3 on CPU): the ceiling for compute-bound prefill. On the CPU the
    faster of `dtype` and fp32: a CPU without AVX-512 BF16 runs torch's bf16 GEMM at ~1 GFLOP/s (2-core AVX2 VM:
    0.0009 TFLOP/s against fp32's 0.12), far below what the CPU can do and what the packed kernels reach, which
    made bf16 prefill read as 5000% MFU (`dtype` is timed first at 512^3, twice: ~0.5 s where it is that slow)."""
    if device.type == "cpu" and dtype != torch.float32 and n is None:
        fp32 = measure_matmul_rate(device, torch.float32, repeats)
        return max(fp32, measure_matmul_rate(device, dtype, 2, 512))
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: the embedding table is excluded (one row per token) unless it is
    tied, in which case it is read whole as the output projection."""
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if model.lm_head is None:
        total += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def matmul_params(model) -> int:
    """Parameters that take part in matmuls per token (the embedding lookup excluded, the LM head included)."""
    def count(name, p) -> int:  # packed INT4 holds two weights per byte; scales and zeros are no matmul weights
        if name.endswith((".scales", ".zeros")):
            return 0
        return 2 * p.numel() if name.endswith(".qweight") and p.dtype == torch.uint8 else p.numel()

    total = sum(count(n, p) for n, p in model.named_parameters() if "embed_tokens" not in n)
    if model.lm_head is None:
        total += model.embed_tokens.weight.numel()
    return total


def kv_bytes_per_token(model, dtype: torch.dtype) -> int:
    attn = model.layers[0].self_attn
    return 2 * len(model.layers) * attn.num_kv_heads * attn.head_dim * dtype.itemsize


def attention_flops(model, query_len: int, context_len: int) -> float:
    """QK^T and PV for `query_len` causal queries ending at `context_len`: 4 * layers * heads * head_dim * pairs."""
    attn = model.layers[0].self_attn
    pairs = query_len * context_len - query_len * (query_len - 1) / 2
    return 4.0 * len(model.layers) * attn.num_heads * attn.head_dim * pairs


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/tuili"],
                               capture_output=True, text=True, cwd=os.path.dirname(__file__)).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device) -> dict:
    """What every result file records: device, versions, commit."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # TUILI_COMMIT: set by scripts/gpu_session.sh, since the device's copy of the tree has stale git metadata
    commit = os.environ.get("TUILI_COMMIT") or _git_commit()
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version, "commit": commit}
