"""Triton elementwise kernels (RMSNorm, RoPE, q/k norm + RoPE, SiLU-and-mul) against their torch references.

Without a GPU they run in the Triton interpreter on CPU (fp32, fp16); on a CUDA GPU they run compiled, also in
bf16, which the interpreter gets wrong.
"""
import os

import torch

if not torch.cuda.is_available():  # before triton is imported or any kernel jitted (tuili builds them lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from tuili.ops.activation import silu_and_mul, silu_and_mul_triton  # noqa: E402
from tuili.ops.argmax import argmax_triton  # noqa: E402
from tuili.ops.step_inputs import fill_step_inputs  # noqa: E402
from tuili.ops.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_triton, rms_norm, rms_norm_triton  # noqa: E402
from tuili.ops.rope import (apply_rope, apply_rope_triton, rotate_rows, qk_norm_rope,  # noqa: E402
                             qk_norm_rope_triton, rope_rows, rope_store_kv_triton)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA GPU", allow_module_level=True)
# Interpreted kernels take CPU tensors and compiled ones CUDA tensors; one process cannot do both.
DEVICE = "cpu" if INTERPRETED else "cuda"
NEEDS_GPU = pytest.mark.skipif(INTERPRETED, reason="needs a CUDA GPU (the Triton interpreter is wrong in bf16)")
DTYPES = [pytest.param(torch.float32, id=f"{DEVICE}-fp32"), pytest.param(torch.float16, id=f"{DEVICE}-fp16"),
          pytest.param(torch.bfloat16, id=f"{DEVICE}-bf16", marks=NEEDS_GPU)]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
EPS = 1e-6


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal shape and dtype; values within the dtype's tolerance, relative to the reference's magnitude."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = TOLERANCE[ref.dtype]
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out, ref, atol=tol * scale, rtol=tol)


def randn(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype)


def norm_weight(size: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return 1 + 0.1 * randn(size, dtype=torch.float32, seed=seed).to(dtype)


def cos_sin(num_tokens: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for random positions: [T, D/2] fp32."""
    positions = torch.randint(0, 4096, (num_tokens,), generator=torch.Generator().manual_seed(2))
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = (positions[:, None].float() * inv_freq).to(DEVICE)
    return freqs.cos(), freqs.sin()


def qk_views(num_tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, fused: bool):
    """q [T, H, D], k [T, KVH, D]: fresh tensors, or strided views split from one [T, (H + 2 KVH) D] qkv."""
    if not fused:
        return (randn(num_tokens, heads, head_dim, dtype=dtype, seed=3),
                randn(num_tokens, kv_heads, head_dim, dtype=dtype, seed=4))
    qkv = randn(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=5)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q.view(-1, heads, head_dim), k.view(-1, kv_heads, head_dim)


TOKENS = [0, 1, 7, 33]
HIDDEN = [64, 576, 96]
# (H, KVH, D)
HEADS = [(9, 3, 64), (4, 4, 128), (8, 1, 32)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_rms_norm(num_tokens, hidden, dtype):
    x, weight = randn(num_tokens, hidden, dtype=dtype), norm_weight(hidden, dtype)
    assert_close(rms_norm_triton(x, weight, EPS), rms_norm(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_fused_add_rms_norm(num_tokens, hidden, dtype):
    x, residual = randn(num_tokens, hidden, dtype=dtype), randn(num_tokens, hidden, dtype=dtype, seed=7)
    weight = norm_weight(hidden, dtype)
    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = fused_add_rms_norm_triton(x, residual, weight, EPS)
    ref_out, ref_residual = fused_add_rms_norm(x, residual, weight, EPS)
    assert_close(out, ref_out)
    assert_close(new_residual, ref_residual)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before), "inputs must be left untouched"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "qkv-views"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "H{}-KVH{}-D{}".format(*h))
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_apply_rope(num_tokens, heads, fused, dtype):
    num_heads, num_kv_heads, head_dim = heads
    q, k = qk_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, fused)
    cos, sin = cos_sin(num_tokens, head_dim)
    q_before, k_before = q.clone(), k.clone()
    out_q, out_k = apply_rope_triton(q, k, cos, sin)
    ref_q, ref_k = apply_rope(q, k, cos, sin)
    assert_close(out_q, ref_q)
    assert_close(out_k, ref_k)
    assert torch.equal(q, q_before) and torch.equal(k, k_before), "rope returns new tensors"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "qkv-views"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "H{}-KVH{}-D{}".format(*h))
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_qk_norm_rope(num_tokens, heads, fused, dtype):
    num_heads, num_kv_heads, head_dim = heads
    q, k = qk_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, fused)
    q_weight, k_weight = norm_weight(head_dim, dtype, seed=8), norm_weight(head_dim, dtype, seed=9)
    cos, sin = cos_sin(num_tokens, head_dim)
    out_q, out_k = qk_norm_rope_triton(q, k, q_weight, k_weight, EPS, cos, sin)
    ref_q, ref_k = qk_norm_rope(q, k, q_weight, k_weight, EPS, cos, sin)
    assert_close(out_q, ref_q)
    assert_close(out_k, ref_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("norm", [False, True], ids=["rope", "qk-norm-rope"])
def test_rope_reads_table_rows_at_positions(norm, pos_dtype, dtype):
    """With `positions`, the kernels take the whole cos/sin tables (the model's path: no gather before)."""
    num_heads, num_kv_heads, head_dim = HEADS[-1]
    q, k = qk_views(37, num_heads, num_kv_heads, head_dim, dtype, True)
    cos, sin = cos_sin(300, head_dim)
    positions = torch.randint(0, 300, (37,), generator=torch.Generator().manual_seed(3)).to(DEVICE, pos_dtype)
    if norm:
        w = norm_weight(head_dim, dtype, seed=8), norm_weight(head_dim, dtype, seed=9)
        out = qk_norm_rope_triton(q, k, *w, EPS, cos, sin, positions)
        ref = qk_norm_rope(q, k, *w, EPS, cos[positions.long()], sin[positions.long()])
    else:
        out = apply_rope_triton(q, k, cos, sin, positions)
        ref = apply_rope(q, k, cos[positions.long()], sin[positions.long()])
    assert_close(out[0], ref[0])
    assert_close(out[1], ref[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
def test_rope_and_kv_store_in_one_kernel(heads, dtype):
    """rope_store_kv_triton: the rotated q, and the rotated k and v in the cache at each token's slot, equal to
    apply_rope then store_kv_cache (the reference); a padding token (slot -1) stores nothing, other slots keep
    what they held."""
    from tuili.ops.attention import store_kv_cache

    num_heads, num_kv_heads, head_dim = heads
    qkv = randn(7, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=5)  # views of a fused qkv
    q, k, v = (t.view(7, -1, head_dim) for t in qkv.split([num_heads * head_dim, num_kv_heads * head_dim,
                                                           num_kv_heads * head_dim], dim=-1))
    cos, sin = cos_sin(300, head_dim)
    positions = torch.randint(0, 300, (7,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    slots = torch.tensor([5, 0, 17, -1, 30, 8, 2], device=DEVICE)
    caches = [randn(4, 8, num_kv_heads, head_dim, dtype=dtype, seed=s) for s in (6, 7)]  # 4 blocks of 8 slots
    want = [c.clone() for c in caches]
    ref_q, ref_k = apply_rope(q, k, cos[positions], sin[positions])
    live = slots >= 0
    store_kv_cache(ref_k[live], v[live], *want, slots[live])
    got_q = rope_store_kv_triton(q, k, v, cos, sin, positions, *caches, slots)
    assert_close(got_q, ref_q)
    assert_close(caches[0], want[0])
    assert torch.equal(caches[1], want[1])  # v: copied


def test_programmatic_dependent_launch_where_the_device_has_it():
    """PDL (ops/pdl.py) is asked for on CUDA devices of compute capability 9.0 or later only: never on the CPU
    (the interpreter), where the kernels get PDL off."""
    from tuili.ops import pdl

    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}
    if torch.cuda.is_available():
        on = torch.cuda.get_device_capability()[0] >= 9
        assert pdl.launch_options(torch.device("cuda")) == ({"PDL": True, "launch_pdl": True} if on else {"PDL": False})


@NEEDS_GPU
def test_chain_of_kernels_launched_early_in_a_cuda_graph():
    """64 fused add + RMSNorm kernels, each reading what the one before wrote, replayed as a CUDA graph (with
    PDL where the GPU has it, each kernel launched before the last finished): the same values as the chain run
    in torch, step by step. A kernel that read before its wait would see stale inputs."""
    x, residual = randn(3, 4096, dtype=torch.bfloat16, seed=1), randn(3, 4096, dtype=torch.bfloat16, seed=2)
    weight = randn(4096, dtype=torch.bfloat16, seed=3) * 0.1 + 1

    def chain(norm):
        a, b = x, residual
        for _ in range(64):
            a, b = norm(a, b, weight, EPS)
        return a, b

    chain(fused_add_rms_norm_triton)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(fused_add_rms_norm_triton)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        ref = chain(fused_add_rms_norm)
        assert_close(out[0], ref[0])
        assert_close(out[1], ref[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [64, 576, 96, 2 * 1100])
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_silu_and_mul(num_tokens, width, dtype):
    x = 3 * randn(num_tokens, width, dtype=dtype)
    assert_close(silu_and_mul_triton(x), silu_and_mul(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows(dtype):
    """Rows with padding between them (a column slice of a wider tensor) are read through their stride."""
    wide = randn(5, 2 * 576 + 64, dtype=dtype)
    x, weight = wide[:, :576], norm_weight(576, dtype)
    assert_close(rms_norm_triton(x, weight, EPS), rms_norm(x, weight, EPS))
    gate_up = wide[:, :2 * 576]
    assert_close(silu_and_mul_triton(gate_up), silu_and_mul(gate_up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_rows_match_the_reference_bit_for_bit(dtype):
    """The CPU path's rope (table rows made once per step, full-width factors, q and k rotated as one tensor
    of their side-by-side heads, a strided view of qkv) rounds as apply_rope does."""
    gen = torch.Generator().manual_seed(0)
    cos, sin = torch.randn(64, 16, generator=gen), torch.randn(64, 16, generator=gen)
    positions = torch.tensor([3, 17, 17, 60])
    qkv = torch.randn(4, 10, 32, generator=gen).to(dtype)
    q, k = qkv[:, :6], qkv[:, 6:8]
    expected = apply_rope(q, k, cos[positions], sin[positions])
    got = rotate_rows(qkv[:, :8], *rope_rows(cos, sin, positions, dtype)).split([6, 2], dim=1)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("n, v", [(1, 128256), (3, 49152), (2, 151936), (1, 1000), (9, 65536), (2, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_triton_is_torch_argmax(n, v, dtype):
    """Greedy decoding's argmax kernel gives torch's argmax, ties to the first index also across its tiles and
    lanes, for rows that are all -inf and for strided rows."""
    gen = torch.Generator().manual_seed(v + n)
    x = torch.randint(0, 50, (n, v), generator=gen).to(dtype)  # many ties
    x[0, v // 2] = x[0, v - 1] = 60.0  # equal maxima in different tiles
    x[-1] = float("-inf")
    x = x.to(DEVICE)
    assert torch.equal(argmax_triton(x).cpu(), x.cpu().float().argmax(dim=-1))
    y = torch.randn(n, 2 * v, generator=gen).to(dtype).to(DEVICE)[:, ::2]  # strided: copied first
    assert torch.equal(argmax_triton(y).cpu(), y.cpu().float().argmax(dim=-1))
    if v <= 1000:  # many chunks per row (the counts reset by each call's last program, reused by the next)
        assert torch.equal(argmax_triton(y, chunk=64).cpu(), y.cpu().float().argmax(dim=-1))


@pytest.mark.parametrize("query_len, bs, size, pending", [(1, 3, 4, True), (1, 1, 1, False), (3, 2, 4, True),
                                                          (1, 5, 8, False)])
def test_fill_step_inputs_matches_the_copies(query_len, bs, size, pending):
    """The one-kernel fill of a decode graph's static inputs writes what DecodeGraphs.run's copies and fills
    wrote: each row's token (the pending ones from the previous step's samples), position, slot, each sequence's
    length and block table, and the padded sequences' scratch slots, length and table; nothing else changes."""
    gen = torch.Generator().manual_seed(query_len * 100 + bs)
    rows, max_blocks, scratch_block, width = 8 * query_len, 40, 99, 7
    out = dict(input_ids=torch.randint(0, 1000, (rows,), generator=gen),
               positions=torch.randint(0, 1000, (rows,), generator=gen),
               slot_mapping=torch.randint(0, 1000, (rows,), generator=gen),
               seq_lens=torch.randint(0, 1000, (8,), generator=gen, dtype=torch.int32),
               block_tables=torch.randint(0, 1000, (8, max_blocks), generator=gen, dtype=torch.int32))
    out = {k: v.to(DEVICE) for k, v in out.items()}
    n = bs * query_len
    ids, pos, slots = (torch.randint(0, 5000, (n,), generator=gen, dtype=torch.int32) for _ in range(3))
    lens = torch.randint(1, 100, (bs,), generator=gen, dtype=torch.int32)
    tables = torch.randint(0, 500, (bs, width), generator=gen, dtype=torch.int32)
    tokens = torch.randint(0, 5000, (6,), generator=gen)
    which = torch.full((n,), -1, dtype=torch.int32)
    which[query_len - 1::query_len] = torch.arange(bs, dtype=torch.int32) % 6  # each sequence's last row
    want = {k: v.clone() for k, v in out.items()}
    want["input_ids"][:n] = torch.where(which.to(DEVICE) >= 0, tokens.to(DEVICE)[which.clamp(min=0).long().to(DEVICE)],
                                        ids.to(DEVICE).long()) if pending else ids.to(DEVICE).long()
    want["positions"][:n] = pos.to(DEVICE).long()
    want["slot_mapping"][:n] = slots.to(DEVICE).long()
    want["seq_lens"][:bs] = lens.to(DEVICE)
    want["block_tables"][:bs, :width] = tables.to(DEVICE)
    want["slot_mapping"][n:size * query_len] = 12345
    want["seq_lens"][bs:size] = query_len
    want["block_tables"][bs:size] = scratch_block
    fill_step_inputs(out, ids.to(DEVICE), pos.to(DEVICE), slots.to(DEVICE), lens.to(DEVICE), tables.to(DEVICE), size,
                     query_len, 12345, scratch_block, (which.to(DEVICE), tokens.to(DEVICE)) if pending else None)
    for k in out:
        assert torch.equal(out[k], want[k]), k
