"""Triton paged attention (ops/attention_triton.py) against the torch reference (ops/attention.py).

Without a GPU the kernels run in the Triton interpreter (set below, before anything compiles a kernel), which
is right in fp32/fp16 but not in bf16: bf16 and the big shapes run on CUDA only.
"""
from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from tuili.ops.attention import dequantize_kv, paged_attention, quantize_kv, store_kv_cache  # noqa: E402
from tuili.ops.attention_metadata import AttentionMetadata  # noqa: E402
from tuili.ops.rope import apply_rope  # noqa: E402
from tuili.ops.attention_triton import (  # noqa: E402
    _kernels, choose_num_splits, paged_attention_triton, paged_decode_attention, paged_prefill_attention,
    store_kv_cache_triton, warm_up_kernels)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the Triton interpreter is wrong in bf16)")
ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# small tiles in the interpreter (fast, and many tiles per sequence); the kernels' own defaults on a GPU
PREFILL_TILES = dict(block_m=None, block_n=None) if CUDA else dict(block_m=32, block_n=32)
DECODE_BLOCK_N = None if CUDA else 16


def cpu_and_cuda() -> list:
    """fp32 and fp16 everywhere, bf16 on CUDA only."""
    return [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
            pytest.param(torch.bfloat16, id="bf16", marks=needs_cuda)]


def make_batch(query_lens: list[int], seq_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int,
               dtype: torch.dtype, seed: int = 0) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
    """Random caches (spare blocks too, so a wrong gather shows) and metadata built as ModelRunner builds it,
    each sequence's blocks shuffled across the cache."""
    rng = random.Random(seed)
    needed = [-(-s // block_size) for s in seq_lens]
    blocks = list(range(sum(needed) + 3))
    rng.shuffle(blocks)
    tables, slots = [], []
    for q_len, s_len, n in zip(query_lens, seq_lens, needed):
        table, blocks = blocks[:n], blocks[n:]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(s_len - q_len, s_len)]
    width = max(len(t) for t in tables) or 1
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    as_tensor = lambda x, dt: torch.tensor(x, dtype=dt, device=DEVICE)  # noqa: E731
    meta = AttentionMetadata(
        slot_mapping=as_tensor(slots, torch.long),
        block_tables=as_tensor([t + [0] * (width - len(t)) for t in tables], torch.int32),
        seq_lens=as_tensor(seq_lens, torch.int32), query_start_loc=as_tensor(starts, torch.int32),
        seq_lens_cpu=seq_lens, query_lens_cpu=query_lens, max_query_len=max(query_lens), max_seq_len=max(seq_lens))
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (sum(needed) + 3, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=gen, device=DEVICE).to(dtype) for _ in range(2))
    return meta, k_cache, v_cache


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
              scale: float) -> torch.Tensor:
    return paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale)


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=0)


def random_q(meta: AttentionMetadata, num_heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """q as the model hands it over: a strided view of a fused qkv projection output."""
    num_tokens = sum(meta.query_lens_cpu)
    qkv = torch.randn(num_tokens, num_heads + 2, head_dim, device=DEVICE).to(dtype)
    return qkv[:, :num_heads]


# ---- the torch reference's own paths ---------------------------------------------------------------------------

@pytest.mark.parametrize("query_len, seq_len", [(1, 1), (1, 70), (4, 4), (5, 21), (16, 160)])
def test_reference_single_sequence_path(query_len, seq_len):
    """The CPU path for one sequence's few new tokens (decode, verification: one fp32 matmul per kv head, the
    mask among the new tokens only) against the general one (the same sequence twice in a batch)."""
    meta, k_cache, v_cache = make_batch([query_len] * 2, [seq_len] * 2, 16, 3, 64, torch.float32)
    cpu = {f.name: getattr(meta, f.name).cpu() for f in dataclasses.fields(meta)
           if isinstance(getattr(meta, f.name), torch.Tensor)}
    meta, k_cache, v_cache = dataclasses.replace(meta, **cpu), k_cache.cpu(), v_cache.cpu()
    meta = dataclasses.replace(meta, block_tables=meta.block_tables[[0, 0]])  # both rows: sequence 0
    q = random_q(meta, 9, 64, torch.float32)[:query_len].cpu()
    one = dataclasses.replace(meta, block_tables=meta.block_tables[:1], seq_lens=meta.seq_lens[:1],
                              query_start_loc=meta.query_start_loc[:2], seq_lens_cpu=[seq_len],
                              query_lens_cpu=[query_len])
    general = paged_attention(q.repeat(2, 1, 1), k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(paged_attention(q, k_cache, v_cache, one, 0.125), general[:query_len],
                               atol=1e-6, rtol=0)


# ---- store_kv_cache ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", cpu_and_cuda())
@pytest.mark.parametrize("num_kv_heads, head_dim", [(1, 64), (3, 128), (8, 32)])
def test_store_kv_cache(dtype, num_kv_heads, head_dim):
    meta, k_cache, v_cache = make_batch([5, 1, 17], [20, 9, 17], 16, num_kv_heads, head_dim, dtype)
    num_tokens = 23
    qkv = torch.randn(num_tokens, (4 + 2) * num_kv_heads * head_dim, device=DEVICE).to(dtype)
    k = qkv[:, 4 * num_kv_heads * head_dim:5 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, 5 * num_kv_heads * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    assert not k.is_contiguous()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_cache(k, v, k_ref, v_ref, meta.slot_mapping)
    store_kv_cache_triton(k, v, k_cache, v_cache, meta.slot_mapping)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_store_kv_cache_skips_padding_slots():
    k_cache = torch.zeros(2, 8, 2, 32, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    k, v = torch.ones(3, 2, 32, device=DEVICE), torch.full((3, 2, 32), 2.0, device=DEVICE)
    store_kv_cache_triton(k, v, k_cache, v_cache, torch.tensor([9, -1, 3], device=DEVICE))
    assert k_cache.view(16, 2, 32)[[9, 3]].eq(1).all() and v_cache.view(16, 2, 32)[[9, 3]].eq(2).all()
    assert k_cache.sum() == 2 * 2 * 32


# ---- decode -------------------------------------------------------------------------------------------------

DECODE_CASES = [  # (seq_lens, num_kv_heads, group, head_dim)
    ([333], 2, 1, 64),
    ([1, 15, 17, 100, 333], 2, 3, 128),
    ([17, 100], 1, 4, 64),
    ([1, 15, 17, 100, 333], 1, 8, 128),
]


@pytest.mark.parametrize("dtype", cpu_and_cuda())
@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("seq_lens, num_kv_heads, group, head_dim", DECODE_CASES)
def test_decode(seq_lens, num_kv_heads, group, head_dim, num_splits, dtype):
    meta, k_cache, v_cache = make_batch([1] * len(seq_lens), seq_lens, 16, num_kv_heads, head_dim, dtype)
    q = random_q(meta, num_kv_heads * group, head_dim, dtype)
    scale = head_dim ** -0.5
    out = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, num_splits,
                                 block_n=DECODE_BLOCK_N)
    check(out, reference(q, k_cache, v_cache, meta, scale), dtype)


@pytest.mark.parametrize("dtype", cpu_and_cuda())
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("seq_lens, num_kv_heads, group, head_dim", [([1, 15, 17, 100, 333], 2, 3, 128),
                                                                    ([64, 65, 200], 1, 4, 64)])
def test_decode_applies_rope_and_stores_the_new_kv(seq_lens, num_kv_heads, group, head_dim, num_splits, dtype):
    """rope=: q, k, v before RoPE (views of a fused qkv) give what RoPE, the K/V store and decode attention give
    one after the other (the torch references), and leave the new token's rotated k and its v in the cache at
    its slot, the rest of the cache as it was."""
    meta, k_cache, v_cache = make_batch([1] * len(seq_lens), seq_lens, 16, num_kv_heads, head_dim, dtype)
    num_heads, half = num_kv_heads * group, head_dim // 2
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    qkv = torch.randn(len(seq_lens), num_heads + 2 * num_kv_heads, head_dim, generator=gen, device=DEVICE).to(dtype)
    q, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    freqs = torch.outer(torch.arange(512.0), 10000.0 ** (-torch.arange(half) / half)).to(DEVICE)
    cos, sin = freqs.cos(), freqs.sin()  # [positions, D / 2] fp32, as RotaryEmbedding keeps them
    positions = meta.seq_lens.long() - 1
    scale = head_dim ** -0.5
    want_k, want_v = k_cache.clone(), v_cache.clone()
    rotated_q, rotated_k = apply_rope(q, k, cos[positions], sin[positions])
    store_kv_cache(rotated_k, v, want_k, want_v, meta.slot_mapping)
    ref = reference(rotated_q, want_k, want_v, meta, scale)
    out = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, num_splits,
                                 block_n=DECODE_BLOCK_N, rope=(k, v, cos, sin, positions, meta.slot_mapping))
    check(out, ref, dtype)
    torch.testing.assert_close(k_cache, want_k, atol=ATOL[dtype], rtol=0)
    assert torch.equal(v_cache, want_v)
    with pytest.raises(ValueError, match="one new token per sequence"):  # a verification step: rotate first
        paged_decode_attention(q, k_cache, v_cache, meta.block_tables[:1], meta.seq_lens[:1], scale, num_splits,
                               query_len=len(seq_lens), rope=(k, v, cos, sin, positions, meta.slot_mapping))


def test_engine_decodes_the_same_tokens_with_rope_in_the_attention_kernel(tiny_models):
    """Through the engine (tiny Llama, fp32, eager, on the CPU through the Triton interpreter; CUDA runs it in
    graphs: tests/gpu): the Triton kernels, whose decode steps rotate q and k and store the new K/V inside the
    decode attention kernel, give the greedy tokens and log-probs of the torch references."""
    if CUDA:
        pytest.skip("runs the kernels on CPU tensors through the Triton interpreter, which is off on a CUDA machine; "
                    "there tests/gpu/test_engine_gpu.py checks the fast path under CUDA graphs")
    from tuili import LLM, SamplingParams

    llm = LLM(tiny_models["llama"], dtype="float32", enforce_eager=True, kv_cache_memory=0.01, max_num_seqs=2)
    prompts, params = [[5, 17, 300, 42, 7], [9, 8, 7]], SamplingParams(temperature=0, max_tokens=6, logprobs=3)
    want = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.engine.model.set_backends(fused_ops=True, triton_attention=True)
    got = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    for mine, theirs in zip(got, want):
        assert mine.token_ids == theirs.token_ids
        for step, ref in zip(mine.logprobs, theirs.logprobs):  # the top-3 log-probs at each step, to fp32 rounding
            assert step.keys() == ref.keys()
            assert all(abs(lp.logprob - ref[token].logprob) < 1e-4 for token, lp in step.items())


@pytest.mark.parametrize("dtype", cpu_and_cuda())
@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("query_len, seq_lens, group", [(2, [2, 17, 100], 4), (5, [5, 16, 21, 333], 3),
                                                        (9, [9, 40], 1), (5, [5, 34], 4), (16, [16, 50], 4),
                                                        (5, [130, 5], 2)])
def test_decode_several_tokens_per_sequence(query_len, seq_lens, group, num_splits, dtype):
    """Speculative verification: every sequence `query_len` new tokens, causal among them, through the
    flash-decoding kernel (splits shorter than query_len at the end: rows that see none of a split)."""
    meta, k_cache, v_cache = make_batch([query_len] * len(seq_lens), seq_lens, 16, 2, 64, dtype)
    q = random_q(meta, 2 * group, 64, dtype)
    out = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.125, num_splits,
                                 block_n=DECODE_BLOCK_N, query_len=query_len)
    check(out, reference(q, k_cache, v_cache, meta, 0.125), dtype)


def test_verification_dispatches_to_decode_kernel(monkeypatch):
    """A verification step (the runner's flag: k + 1 new tokens per sequence) -> the decode kernel, unless its
    rows per kv head exceed MULTI_QUERY_ROWS; the same shape as a plain prefill -> the prefill kernel (no kernel
    variant per prompt length)."""
    import tuili.ops.attention_triton as attention_triton

    prefill = attention_triton.paged_prefill_attention
    calls = []
    monkeypatch.setattr(attention_triton, "paged_prefill_attention",
                        lambda *a, **kw: calls.append(1) or prefill(*a, **kw))
    for query_lens, seq_lens, group, verification, expected in [([5, 5], [30, 70], 4, True, 0),
                                                                ([5, 5], [30, 70], 4, False, 1),
                                                                ([17], [40], 4, True, 1)]:
        meta, k_cache, v_cache = make_batch(query_lens, seq_lens, 16, 2, 64, torch.float32)
        meta.verification = verification
        q = random_q(meta, 2 * group, 64, torch.float32)
        calls.clear()
        check(paged_attention_triton(q, k_cache, v_cache, meta, 0.125), reference(q, k_cache, v_cache, meta, 0.125),
              torch.float32)
        assert len(calls) == expected


def test_decode_launch_early_is_the_same_attention():
    """launch_early (one decode row; only where the next kernel launches changes on the GPU, PDL): the same result,
    through paged_attention_triton as the engine calls it."""
    meta, k_cache, v_cache = make_batch([1], [150], 16, 2, 64, torch.float32)
    q = random_q(meta, 8, 64, torch.float32)
    early = paged_attention_triton(q, k_cache, v_cache, meta, 0.125, launch_early=True)
    assert torch.equal(early, paged_attention_triton(q, k_cache, v_cache, meta, 0.125))
    check(early, reference(q, k_cache, v_cache, meta, 0.125), torch.float32)


@pytest.mark.parametrize("block_size", [8, 32])
def test_decode_other_block_sizes_and_dispatch(block_size):
    meta, k_cache, v_cache = make_batch([1] * 3, [5, 70, 129], block_size, 2, 64, torch.float32)
    q = random_q(meta, 8, 64, torch.float32)
    check(paged_attention_triton(q, k_cache, v_cache, meta, 0.125),
          reference(q, k_cache, v_cache, meta, 0.125), torch.float32)


def test_decode_launch_is_independent_of_seq_lens():
    """The CUDA-graph contract: the same launch (batch, splits) serves new seq_lens and block tables, and a
    padded entry with seq_len 0 gives zeros, not NaN."""
    meta, k_cache, v_cache = make_batch([1] * 3, [40, 3, 90], 16, 2, 64, torch.float32)
    q = random_q(meta, 4, 64, torch.float32)
    for seq_lens in ([40, 3, 90], [2, 33, 64], [1, 0, 17]):
        meta.seq_lens.copy_(torch.tensor(seq_lens))
        meta.seq_lens_cpu, meta.max_seq_len = seq_lens, max(seq_lens)
        out = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.125, 4,
                                     block_n=DECODE_BLOCK_N)
        live = [i for i, s in enumerate(seq_lens) if s]
        ref = reference(q[live], k_cache, v_cache, _select(meta, live), 0.125)
        check(out[live], ref, torch.float32)
        assert not out.isnan().any() and out[[i for i, s in enumerate(seq_lens) if not s]].eq(0).all()


def _select(meta: AttentionMetadata, rows: list[int]) -> AttentionMetadata:
    seq_lens = [meta.seq_lens_cpu[i] for i in rows]
    return AttentionMetadata(meta.slot_mapping[rows], meta.block_tables[rows], meta.seq_lens[rows],
                             torch.arange(len(rows) + 1, dtype=torch.int32, device=DEVICE), seq_lens,
                             [1] * len(rows), 1, max(seq_lens))


def test_warm_up_runs_every_variant_and_writes_nothing():
    _, k_cache, v_cache = make_batch([1], [40], 16, 2, 64, torch.float32)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    tables = (torch.rand(8, 32, device=DEVICE), torch.rand(8, 32, device=DEVICE))  # RoPE's cos, sin
    warm_up_kernels(k_cache, v_cache, num_heads=4, dtype=torch.float32, max_splits=4, rope_tables=tables)
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


def _compiled_variants() -> int:
    kernels = _kernels()
    return sum(len(cache[0]) for fn in (kernels.decode, kernels.merge, kernels.prefill)
               for cache in fn.device_caches.values())


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_warm_up_compiles_what_mixed_steps_need(dtype):
    """After the warm-up, verification steps and mixed batches of any shape (decodes sliced off at any offset,
    any table width, any split count) compile nothing new: the first requests of a server do not wait for
    Triton."""
    _, k_cache, v_cache = make_batch([1], [1], 16, 8, 128, dtype)
    warm_up_kernels(k_cache, v_cache, num_heads=32, dtype=dtype, verify_query_len=5)
    before = _compiled_variants()
    for seq_lens in ([5, 40, 3000], [300]):  # verification steps (k = 4), one split and several
        meta, k, v = make_batch([5] * len(seq_lens), seq_lens, 16, 8, 128, dtype, seed=len(seq_lens))
        meta.verification = True
        q = random_q(meta, 32, 128, dtype)
        check(paged_attention_triton(q, k, v, meta, 0.1), reference(q, k, v, meta, 0.1), dtype)
    for query_lens, seq_lens in [([1, 1, 20, 45, 1], [100, 17, 20, 130, 1]), ([1, 1, 1, 300], [5000, 70, 3, 2500]),
                                 ([2100], [2100]), ([1] * 7, [1, 20, 33, 400, 1000, 17, 9]), ([1, 77], [3000, 77]),
                                 ([1] * 5 + [3000], [60] * 5 + [3000])]:
        meta, k, v = make_batch(query_lens, seq_lens, 16, 8, 128, dtype, seed=len(seq_lens))
        q = random_q(meta, 32, 128, dtype)
        check(paged_attention_triton(q, k, v, meta, 0.1), reference(q, k, v, meta, 0.1), dtype)
    assert _compiled_variants() == before


def test_choose_num_splits():
    assert choose_num_splits(1, 8, 32768) == 32            # 8 programs: about two per SM of 132 (33 -> 32)
    assert choose_num_splits(1, 1, 32768) == 64            # capped
    assert choose_num_splits(1, 8, 40) == 2                # never more splits than pages (3), a power of two
    assert choose_num_splits(256, 8, 32768) == 1           # a big batch fills the GPU alone
    assert choose_num_splits(4, 8, 4096, num_sms=16) == 1


# ---- prefill, chunked prefill, mixed ------------------------------------------------------------------------

PREFILL_CASES = [  # (query_lens, seq_lens): fresh prompts, chunks after earlier context, prefill + decodes
    pytest.param([1, 5, 40, 130], [1, 5, 40, 130], id="prefill"),
    pytest.param([7, 32, 50], [50, 100, 50], id="chunked"),
    pytest.param([1, 20, 1, 45, 1], [100, 20, 17, 130, 1], id="mixed"),
]
HEADS = [(2, 1, 64), (1, 3, 128), (2, 4, 64), (1, 8, 128)]  # (num_kv_heads, group, head_dim)


@pytest.mark.parametrize("dtype", cpu_and_cuda())
@pytest.mark.parametrize("num_kv_heads, group, head_dim", HEADS)
@pytest.mark.parametrize("query_lens, seq_lens", PREFILL_CASES)
def test_prefill(query_lens, seq_lens, num_kv_heads, group, head_dim, dtype):
    meta, k_cache, v_cache = make_batch(query_lens, seq_lens, 16, num_kv_heads, head_dim, dtype)
    q = random_q(meta, num_kv_heads * group, head_dim, dtype)
    scale = head_dim ** -0.5
    out = paged_prefill_attention(q, k_cache, v_cache, meta, scale, **PREFILL_TILES)
    check(out, reference(q, k_cache, v_cache, meta, scale), dtype)


def test_prefill_dispatch_and_store():
    """The layer's sequence: store this step's K/V, then attend, all through the Triton paths."""
    meta, k_cache, v_cache = make_batch([3, 9], [10, 9], 8, 2, 32, torch.float16)
    k, v = (torch.randn(12, 2, 32, device=DEVICE).half() for _ in range(2))
    q = random_q(meta, 4, 32, torch.float16)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_cache(k, v, k_ref, v_ref, meta.slot_mapping)
    store_kv_cache_triton(k, v, k_cache, v_cache, meta.slot_mapping)
    check(paged_attention_triton(q, k_cache, v_cache, meta, 0.2), reference(q, k_ref, v_ref, meta, 0.2),
          torch.float16)


@pytest.mark.parametrize("dtype", cpu_and_cuda())
@pytest.mark.parametrize("query_lens, seq_lens", [([1, 1, 20, 45, 1], [100, 17, 20, 130, 1]),
                                                  ([1, 1, 1, 7], [33, 1, 64, 50])])
def test_mixed_batch_splits_leading_decodes(query_lens, seq_lens, dtype):
    """The dispatcher sends the leading decodes to the decode kernel and the rest to the prefill kernel."""
    meta, k_cache, v_cache = make_batch(query_lens, seq_lens, 16, 2, 64, dtype)
    q = random_q(meta, 8, 64, dtype)
    check(paged_attention_triton(q, k_cache, v_cache, meta, 0.125),
          reference(q, k_cache, v_cache, meta, 0.125), dtype)


# ---- quantized KV cache (fp8 e4m3 / int8 with a scale per token and kv head) ---------------------------------

KV_DTYPES = [pytest.param(torch.float8_e4m3fn, id="fp8"), pytest.param(torch.int8, id="int8")]
# error of one quantized value relative to its row's amax: int8 half a step of 1/127; e4m3 a 3-bit mantissa
KV_REL_ERR = {torch.int8: 0.5 / 127 + 1e-6, torch.float8_e4m3fn: 2.0 ** -4 + 1e-6}


def quantized_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, kv_dtype: torch.dtype):
    """(k values, v values, k scales, v scales) of the caches, quantized by the torch reference."""
    (kq, ks), (vq, vs) = quantize_kv(k_cache, kv_dtype), quantize_kv(v_cache, kv_dtype)
    return kq, vq, ks, vs


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("dtype", cpu_and_cuda())
def test_store_kv_cache_quantized(dtype, kv_dtype):
    """The Triton store quantizes like the reference (one step apart at most, where a division rounds the
    other way), and the stored values come back within the format's error."""
    meta, k_cache, v_cache = make_batch([5, 1, 17], [20, 9, 17], 16, 3, 64, dtype)
    gen = torch.Generator(device=DEVICE).manual_seed(1)  # fixed inputs, whatever ran before
    k, v = (torch.randn(23, 3, 64, generator=gen, device=DEVICE).to(dtype) * 3 for _ in range(2))
    caches = []
    for store in (store_kv_cache, store_kv_cache_triton):
        kq, vq, ks, vs = quantized_caches(k_cache, v_cache, kv_dtype)
        store(k, v, kq, vq, meta.slot_mapping, ks, vs)
        caches.append([dequantize_kv(kq, ks, torch.float32), dequantize_kv(vq, vs, torch.float32), ks, vs])
    for ref, out in zip(*caches):
        assert torch.equal(ref.view(-1, *ref.shape[2:])[meta.slot_mapping.long()] != 0,
                           out.view(-1, *out.shape[2:])[meta.slot_mapping.long()] != 0)
    (k_ref, v_ref, ks, vs), (k_out, v_out, _, _) = caches
    for x, ref, out, s in ((k, k_ref, k_out, ks), (v, v_ref, v_out, vs)):
        step = (s * (1.0 if kv_dtype == torch.int8 else 32.0))[..., None]  # one int step; fp8: the top step
        assert ((ref - out).abs() <= step * 1.001).all()
        stored = out.view(-1, 3, 64)[meta.slot_mapping.long()]
        amax = x.float().abs().amax(-1, keepdim=True)
        assert ((stored - x.float()).abs() <= amax * KV_REL_ERR[kv_dtype]).all()


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("dtype", cpu_and_cuda())
@pytest.mark.parametrize("query_lens, seq_lens", [([1, 1, 1, 1, 1], [1, 15, 17, 100, 333]),
                                                  ([5, 5, 5], [5, 40, 333]),
                                                  ([1, 20, 1, 45, 1], [100, 20, 17, 130, 1]),
                                                  ([7, 32, 50], [50, 100, 50])])
def test_attention_reads_quantized_cache(query_lens, seq_lens, dtype, kv_dtype):
    """Decode, verification, prefill and mixed steps over an fp8/int8 cache equal the reference over the same
    quantized cache, and stay close to attention over the unquantized one."""
    meta, k_cache, v_cache = make_batch(query_lens, seq_lens, 16, 2, 64, dtype)
    q = random_q(meta, 6, 64, dtype)
    kq, vq, ks, vs = quantized_caches(k_cache, v_cache, kv_dtype)
    if len(set(query_lens)) == 1 and query_lens[0] <= 8:  # decodes, verification
        out = paged_decode_attention(q, kq, vq, meta.block_tables, meta.seq_lens, 0.125, 4,
                                     block_n=DECODE_BLOCK_N, k_scale=ks, v_scale=vs, query_len=query_lens[0])
    else:
        out = paged_attention_triton(q, kq, vq, meta, 0.125, k_scale=ks, v_scale=vs)
    ref = paged_attention(q.float(), kq, vq, meta, 0.125, ks, vs)
    check(out, ref, dtype)
    exact = reference(q, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(out.float(), exact, atol=0.05 if kv_dtype == torch.int8 else 0.2, rtol=0)


def test_quantized_cache_needs_its_scales():
    meta, k_cache, v_cache = make_batch([1], [20], 16, 2, 64, torch.float32)
    kq, vq, ks, vs = quantized_caches(k_cache, v_cache, torch.int8)
    q = random_q(meta, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="scale"):
        paged_decode_attention(q, kq, vq, meta.block_tables, meta.seq_lens, 0.1, 1)
    with pytest.raises(ValueError, match="scale"):
        paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.1, 1, k_scale=ks, v_scale=vs)


# ---- big shapes, CUDA only ----------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("seq_lens, group, head_dim", [
    ([32768], 8, 128), ([32768, 1, 4097, 20000], 4, 128), ([7000] * 16, 1, 64), ([32768] * 2, 3, 256)])
@pytest.mark.parametrize("num_splits", [1, None])
def test_decode_long(seq_lens, group, head_dim, num_splits, dtype):
    meta, k_cache, v_cache = make_batch([1] * len(seq_lens), seq_lens, 16, 2, head_dim, dtype)
    q = random_q(meta, 2 * group, head_dim, dtype)
    num_splits = num_splits or choose_num_splits(len(seq_lens), 2, 32768)
    out = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, head_dim ** -0.5,
                                 num_splits)
    check(out, reference(q, k_cache, v_cache, meta, head_dim ** -0.5), dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("query_lens, seq_lens, group, head_dim", [
    ([4096], [4096], 4, 128), ([1000, 4096, 1, 77], [1000, 8192, 5000, 77], 8, 128),
    ([2048, 300], [2048, 3000], 1, 64), ([1500], [2500], 3, 256)])
def test_prefill_long(query_lens, seq_lens, group, head_dim, dtype):
    meta, k_cache, v_cache = make_batch(query_lens, seq_lens, 16, 2, head_dim, dtype)
    q = random_q(meta, 2 * group, head_dim, dtype)
    out = paged_attention_triton(q, k_cache, v_cache, meta, head_dim ** -0.5)
    check(out, reference(q, k_cache, v_cache, meta, head_dim ** -0.5), dtype)


@needs_cuda
def test_decode_replays_in_cuda_graph():
    """Captured once, replayed with other seq_lens and block tables written into the same buffers."""
    meta, k_cache, v_cache = make_batch([1] * 4, [5000, 1, 300, 17], 16, 2, 128, torch.bfloat16)
    q = random_q(meta, 8, 128, torch.bfloat16)
    paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.1, 16)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.1, 16)
    for flip, seq_lens in ((False, [4000, 1, 2, 0]), (True, [17, 290, 1, 4999])):
        if flip:  # sequence i now owns what sequence 3 - i did
            meta.block_tables.copy_(meta.block_tables.flip(0))
        meta.seq_lens.copy_(torch.tensor(seq_lens))
        meta.seq_lens_cpu, meta.max_seq_len = seq_lens, max(seq_lens)
        graph.replay()
        live = [i for i, n in enumerate(seq_lens) if n]
        check(out[live], reference(q[live], k_cache, v_cache, _select(meta, live), 0.1), torch.bfloat16)
