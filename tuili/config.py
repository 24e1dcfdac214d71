"""Engine configuration: one dataclass per concern, every knob with one home, a default and a check."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

INT4_GROUP_SIZE = 128  # --quant-group-size's default
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype | None:
    """'auto' -> None (decided later from the model and device); else a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(sorted(_DTYPES))}; got {name!r}")
    return _DTYPES[name]


@dataclass
class EngineArgs:
    """Everything a user can set on the engine (the CLI flags map 1:1 onto these fields)."""

    model: str | None = None            # HF folder, .gguf file, or (load_format='dummy') a shape name / config.json
    tokenizer: str | None = None        # defaults to the model's own
    load_format: str = "auto"           # auto | dummy
    dtype: str = "auto"
    quantization: str | None = None     # int8 | int4: weight-only, at load time
    quant_group_size: int = INT4_GROUP_SIZE  # int4: inputs per group (32, 64, 128)
    quant_symmetric: bool = False       # int4: scales only, no offsets
    gguf_dequantize: bool = False       # a GGUF's quantized blocks load as float (default: kept packed)
    device: str = "auto"                # auto | cpu | cuda
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: float = 1.0        # GiB of KV cache on CPU
    kv_cache_dtype: str = "auto"        # auto (the model's dtype) | fp8 (e4m3) | int8: quantized K/V + scales
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None  # fixes the block count (tests, experiments)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_logprobs: int = 20              # most top logprobs a request may ask for (as vLLM)
    enforce_eager: bool = False         # no CUDA graphs (GPU), no TorchScript step (CPU)
    attention_backend: str = "auto"     # auto (triton on GPU, torch on CPU) | triton | torch
    no_fused_ops: bool = False          # torch references instead of the fused Triton norm/RoPE/SiLU kernels
    no_l2_prefetch: bool = False        # no L2 prefetch of the next weights while a small decode step attends
    async_scheduling: str = "auto"      # auto (on for CUDA) | on | off: prepare step N+1 while step N runs
    speculative_model: str | None = None         # draft model (same tokenizer) for speculative decoding
    speculative_method: str | None = None        # draft (with --speculative-model) | ngram (prompt lookup)
    num_speculative_tokens: int | None = None    # k tokens proposed per step (default 4, CPU 3, when speculating)
    prompt_lookup_max: int = 4                   # ngram: longest suffix matched
    prompt_lookup_min: int = 1                   # ngram: shortest suffix matched
    speculative_disable_batch_size: int = 8      # no speculation while more sequences than this run

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        parse_dtype(self.dtype)
        self.quant_config()  # validates
        self.kv_dtype()
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.attention_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"attention_backend must be auto, triton or torch, got {self.attention_backend!r}")
        if self.async_scheduling not in ("auto", "on", "off"):
            raise ValueError(f"async_scheduling must be auto, on or off, got {self.async_scheduling!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError(f"max_num_batched_tokens must be >= block_size, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {self.max_logprobs}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}")
        self._check_speculative()

    def _check_speculative(self) -> None:
        if self.speculative_method is None and self.speculative_model is not None:
            self.speculative_method = "draft"
        method = self.speculative_method
        if method not in (None, "draft", "ngram"):
            raise ValueError(f"speculative_method must be draft or ngram (or unset), got {method!r}")
        if method == "draft" and not self.speculative_model:
            raise ValueError("speculative_method 'draft' needs --speculative-model (a model with the same tokenizer)")
        if method == "ngram" and self.speculative_model:
            raise ValueError("speculative_method 'ngram' uses no draft model; drop --speculative-model")
        if method is None:
            if self.num_speculative_tokens is not None:
                raise ValueError("num_speculative_tokens needs --speculative-method ngram or --speculative-model")
            return
        if self.num_speculative_tokens is None:
            # the CPU's packed kernels (torch's INT4/INT8 matmuls) take rows four at a time: a 5th row nearly
            # doubles a verification step there, so the CPU verifies 3 proposals + 1 (one block of rows)
            on_cpu = self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available())
            self.num_speculative_tokens = 3 if on_cpu else 4
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1 when speculating, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")
        if self.speculative_disable_batch_size < 1:
            raise ValueError(f"speculative_disable_batch_size must be >= 1, got {self.speculative_disable_batch_size}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**kwargs)

    def quant_config(self):
        """The QuantConfig of --quantization (None: unquantized, or whatever the checkpoint is saved in)."""
        from tuili.quant import METHODS, QuantConfig

        if self.quantization is not None and self.quantization not in METHODS:
            raise ValueError(f"quantization must be {' or '.join(METHODS)} (or unset), got {self.quantization!r}")
        if self.quantization != "int4" and (self.quant_group_size != INT4_GROUP_SIZE or self.quant_symmetric):
            raise ValueError("quant_group_size and quant_symmetric apply to quantization 'int4' only (INT8 is per "
                             f"output channel and symmetric); got them with quantization {self.quantization!r}")
        if self.quantization is None:
            return None
        return QuantConfig(self.quantization, self.quant_group_size, self.quant_symmetric)

    def kv_dtype(self) -> torch.dtype | None:
        """The KV cache's dtype: None (auto: the model's), float8_e4m3fn or int8."""
        from tuili.ops.attention import KV_CACHE_DTYPES

        if self.kv_cache_dtype == "auto":
            return None
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be auto, {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")
        return KV_CACHE_DTYPES[self.kv_cache_dtype]

    def use_triton(self, device: torch.device) -> tuple[bool, bool]:
        """(fused Triton ops, Triton attention) for `device`: Triton needs a GPU; the switches turn it off."""
        on_gpu = device.type == "cuda"
        if self.attention_backend == "triton" and not on_gpu:
            raise ValueError("attention_backend 'triton' needs a CUDA device; use 'torch' on the CPU")
        return on_gpu and not self.no_fused_ops, on_gpu and self.attention_backend != "torch"

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU")
        return torch.device(self.device)


@dataclass
class CacheConfig:
    """The paged KV cache: block size and (after profiling) how many blocks there are."""

    block_size: int
    num_blocks: int = 0
    dtype: torch.dtype = torch.float32


@dataclass
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    num_speculative_tokens: int = 0      # k slots reserved after a decoding sequence's token (0: no speculation)
    speculative_disable_batch_size: int = 0  # speculate only while at most this many sequences run
