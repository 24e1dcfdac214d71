"""The loaders: GGUF tensor types against gguf's dequantization and HF, the real SmolLM2 GGUF's config and
cached tokenizer, sharded and broken HF folders, and dummy weights in every named shape."""
from __future__ import annotations

import glob
import os
import pathlib
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from reference import hf_greedy, hf_logprobs, random_hf_model
from tuili import LLM, SamplingParams
from tuili.layers.linear import MergedLinear
from tuili.layers.rotary import rope_parameters
from tuili.loader import dummy, gguf_file
from tuili.ops.quant_matmul import dequantize_int4, dequantize_int8
from tuili.models.registry import build_model

QT = gguf.GGMLQuantizationType
GGUF_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]
# A tiny Llama whose rows fit K-quant blocks (256 values): hidden 256, FFN 512, head_dim 64.
HEADS, KV_HEADS, HIDDEN, FFN, VOCAB, LAYERS = 4, 2, 256, 512, 512, 2
TINY_LLAMA = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS, vocab_size=VOCAB,
                  max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  initializer_range=0.05)
_GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
PROMPT = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(1)).tolist()


def gguf_name(hf: str) -> str:
    if hf in _GGUF_TOP:
        return _GGUF_TOP[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_LAYER[module]}.{kind}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k row permutation."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute`, from its row order (independent of tuili's implementation)."""
    rows = permute(np.arange(w.shape[0]), n_head)  # permute(w)[i] == w[rows[i]]
    out = np.empty_like(w)
    out[rows] = w
    return out


def random_kquant(shape: tuple[int, int], qtype: QT, rng: np.random.Generator, std: float = 0.05) -> np.ndarray:
    """Valid K-quant blocks from random bytes, scaled to about `std` (for gguf versions that cannot quantize them).

    Every bit pattern is a valid block except the f16 super-block scales, which are set here:
    Q4_K (144 bytes / 256 values): d, dmin f16, 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit quants;
    value = d * sc * q - dmin * m. Q6_K (210 bytes): 128 + 64 bytes of 6-bit quants, 16 int8 scales, d f16;
    value = d * scale * (q - 32).
    """
    rows, cols = shape
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    if qtype == QT.Q4_K:
        d = rng.uniform(0.7, 1.3, raw.shape[:2]) * std / 192
        raw[..., 0:2] = d.astype(np.float16)[..., None].view(np.uint8)
        raw[..., 2:4] = (d * 7.5).astype(np.float16)[..., None].view(np.uint8)  # about zero mean
    elif qtype == QT.Q6_K:
        raw[..., 192:208] = rng.integers(-20, 21, raw[..., 192:208].shape).astype(np.int8).view(np.uint8)
        d = rng.uniform(0.7, 1.3, raw.shape[:2]) * std / 218
        raw[..., 208:210] = d.astype(np.float16)[..., None].view(np.uint8)
    else:
        raise ValueError(qtype)
    return raw.reshape(rows, -1)


def to_float(raw: np.ndarray, qtype: QT) -> np.ndarray:
    return np.asarray(dequantize(raw, qtype), dtype=np.float32).reshape(raw.shape[0], -1)


@pytest.fixture(scope="module")
def tiny_llama_state() -> dict[str, np.ndarray]:
    """A random HF Llama's weights (norms randomised too, so their loading is tested)."""
    return {k: v.numpy().copy() for k, v in random_hf_model("llama", **TINY_LLAMA).state_dict().items()}


def write_tiny_gguf(path: str, state: dict[str, np.ndarray], qtype: QT, vocab_size_key: bool = True):
    """Write `state` as a llama.cpp-style GGUF (no tokenizer metadata); returns {hf name: (raw data, type)}."""
    rng = np.random.default_rng(int(qtype))
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_context_length(512)
    if vocab_size_key:
        writer.add_vocab_size(VOCAB)
    written = {}
    for hf, w in state.items():
        name = gguf_name(hf)
        if name.endswith("attn_q.weight"):
            w = permute(w, HEADS)
        elif name.endswith("attn_k.weight"):
            w = permute(w, KV_HEADS)
        if w.ndim == 1 or qtype == QT.F32:  # norms stay F32
            raw, t = w.astype(np.float32), QT.F32
        elif qtype == QT.F16:
            raw, t = w.astype(np.float16), QT.F16
        else:
            try:
                raw = quantize(w, qtype)
            except NotImplementedError:  # gguf <= 0.19 cannot quantize K-quants: random valid blocks instead
                raw = random_kquant(w.shape, qtype, rng)
            t = qtype
        if t in (QT.F32, QT.F16):
            writer.add_tensor(name, raw)
        else:
            writer.add_tensor(name, raw, raw_dtype=t)
        written[hf] = (raw, t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def expected_weight(hf: str, raw: np.ndarray, qtype: QT) -> torch.Tensor:
    w = to_float(raw, qtype) if raw.ndim == 2 else raw.astype(np.float32)
    if hf.endswith("q_proj.weight"):
        w = unpermute(w, HEADS)
    elif hf.endswith("k_proj.weight"):
        w = unpermute(w, KV_HEADS)
    return torch.from_numpy(np.ascontiguousarray(w))


def tuili_weights(model) -> dict[str, torch.Tensor]:
    """tuili's parameters under HF names (model.hf_state_dict()), packed layers dequantized."""
    state = model.hf_state_dict()
    out = {}
    for name, t in state.items():
        prefix, kind = name.rsplit(".", 1)
        if kind == "qweight":
            scales, offsets = state[f"{prefix}.scales"], state.get(f"{prefix}.offsets")
            k = t.shape[1] * (1 if t.dtype == torch.int8 else 2)
            group = k // scales.shape[1]
            out[f"{prefix}.weight"] = dequantize_int8(t, scales, group) if t.dtype == torch.int8 else \
                dequantize_int4(t, scales, offsets, group)
        elif kind not in ("scales", "offsets"):
            out[name] = t.detach()
    return out


def check_against_hf(llm: LLM, hf, prompt: list[int], atol: float, greedy_tokens: int = 64) -> None:
    """As tests/models/test_llama.py: every prompt position's top-20 logprobs and ranks, then greedy tokens."""
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=20), use_tqdm=False)[0]
    ref = hf_logprobs(hf, prompt)
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert len(entry) >= 20
        for token_id, lp in entry.items():
            assert lp.logprob == pytest.approx(float(ref[pos - 1, token_id]), abs=atol), (pos, token_id)
        assert entry[prompt[pos]].rank == int((ref[pos - 1] > ref[pos - 1, prompt[pos]]).sum()) + 1
    params = SamplingParams(temperature=0, max_tokens=greedy_tokens, ignore_eos=True)
    got = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert got == hf_greedy(hf, prompt, greedy_tokens)


# ---- GGUF tensor types ------------------------------------------------------------------------------------
@pytest.mark.parametrize("type_name", GGUF_TYPES)
def test_gguf_tensor_type(tmp_path, tiny_llama_state, type_name):
    qtype = QT[type_name]
    path = str(tmp_path / f"tiny-{type_name}.gguf")
    written = write_tiny_gguf(path, tiny_llama_state, qtype)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert set(types.values()) == {qtype, QT.F32}, "the file holds the type under test (norms F32)"
    assert "tokenizer.ggml.model" not in gguf.GGUFReader(path).fields

    llm = LLM(path, dtype="float32", kv_cache_memory=0.01)
    packed = {"Q8_0": (torch.int8, 32), "Q6_K": (torch.int8, 16), "Q4_0": (torch.uint8, 32),
              "Q4_1": (torch.uint8, 32), "Q4_K": (torch.uint8, 32)}.get(type_name)
    for module in (m for m in llm.engine.model.modules() if isinstance(m, MergedLinear)):
        if packed is None:
            assert module.qweight is None and module.weight is not None
        else:  # the blocks kept packed (GGUF_TYPES has no mixed file: fused shards share their type)
            assert module.weight is None and (module.qweight.dtype, module.group_size) == packed
    assert llm.get_tokenizer() is None, "no tokenizer metadata: token-id prompts only"
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello", use_tqdm=False)

    # (a) every weight is gguf's dequantization of the stored data, q/k rows back in HF order
    got = tuili_weights(llm.engine.model)
    assert set(got) == set(written)
    for hf_name, (raw, t) in written.items():
        assert torch.equal(got[hf_name], expected_weight(hf_name, raw, t)), hf_name
    if type_name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"):  # quantized from the model: close to it
        tol = {"F32": 0, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 0.01, "Q4_0": 0.1, "Q4_1": 0.1}[type_name]
        for hf_name, w in tiny_llama_state.items():
            err = (got[hf_name] - torch.from_numpy(w)).abs().mean()
            assert err <= tol * float(np.abs(w).mean()) + 1e-9, (hf_name, float(err))

    # (b) HF transformers reading the same file: the same weights, logprobs and greedy tokens
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    hf_state = hf.state_dict()
    for hf_name, w in got.items():
        assert torch.equal(hf_state[hf_name], w), hf_name
    check_against_hf(llm, hf, PROMPT, atol=1e-4, greedy_tokens=32)
    assert llm.engine.block_manager.num_used_blocks == 0
    if packed is not None:  # --gguf-dequantize: the old float path, the same tokens
        float_llm = LLM(path, dtype="float32", kv_cache_memory=0.01, gguf_dequantize=True)
        assert float_llm.engine.model.layers[0].mlp.gate_up_proj.qweight is None
        params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        assert float_llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids == \
            llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("type_name", ["Q8_0", "Q6_K"])
def test_gguf_int8_blocks_run_packed_through_tuilis_cpu_kernels(tmp_path, tiny_llama_state, type_name):
    """Q8_0 / Q6_K layers (INT8 groups of 32 / 16) in bf16 on the CPU: tuili's int8_gemv reads the blocks, in the
    C++ decode step too, and no float copy of a weight is kept; the C++ step, the scripted step and the eager layers
    generate the same tokens (the kernels' arithmetic against the reference: tests/ops/test_cpu_kernels.py)."""
    from tuili.ops import cpu_kernels
    from tuili.runner import cpu_step

    if not cpu_kernels.available():
        pytest.skip(f"tuili's CPU kernels do not run here: {cpu_kernels.why_not()}")
    path = str(tmp_path / f"tiny-{type_name}.gguf")
    write_tiny_gguf(path, tiny_llama_state, QT[type_name])
    llm = LLM(path, dtype="bfloat16", kv_cache_memory=0.01)
    step, group = llm.engine.runner.cpu_step, {"Q8_0": 32, "Q6_K": 16}[type_name]
    assert step.native is not None and set(step.native[1]) == {cpu_step.GEMV8} and set(step.native[2]) == {group}
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [PROMPT, list(range(3, 63))]  # the second's prefill: more than INT8_ROWS rows (int8_dense)
    run = lambda: [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]  # noqa: E731
    native = run()
    layers = [m for m in llm.engine.model.modules() if isinstance(m, MergedLinear)]
    for module in layers:
        assert module.weight is None and module._cpu_dense is None, "no float copy"
        assert module._cpu_int8[0].data_ptr() == module.qweight.data_ptr(), "the kernel reads the blocks"
    step.native = None  # one sequence through the scripted step, then several through the eager layers
    assert run() == native
    together = llm.generate(prompts * 2, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in together] == native * 2
    assert all(module._cpu_dense is None for module in layers)
    half = LLM(path, dtype="float16", kv_cache_memory=0.01)  # fp16 (no kernel for it): the float copy, no error
    assert len(half.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids) == 12
    assert all(m._cpu_int8 == () and m._cpu_dense is not None
               for m in half.engine.model.modules() if isinstance(m, MergedLinear))


def test_gguf_file_reads_what_gguf_reader_reads(tmp_path, tiny_llama_state, default_model_path):
    """tuili's GGUF reader (struct over the mapped file, ~0.2 s for the default model where gguf.GGUFReader takes
    ~4 s) against the gguf package's: every metadata value, and every tensor's name, type, dims and data (dtype
    and shape as gguf gives them), for the default model and tiny files of typed and block types; bad files
    fail with a clear error."""
    paths = [default_model_path]
    for qtype in (QT.BF16, QT.F16, QT.Q6_K):
        paths.append(str(tmp_path / f"tiny-{qtype.name}.gguf"))
        write_tiny_gguf(paths[-1], tiny_llama_state, qtype)
    for path in paths:
        ours, ref = gguf_file.open_reader(path), gguf.GGUFReader(path)
        want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
        assert ours.fields == want
        assert [(t.name, t.tensor_type, t.shape) for t in ours.tensors] == \
            [(t.name, t.tensor_type, tuple(int(d) for d in t.shape)) for t in ref.tensors]
        for a, b in zip(ours.tensors, ref.tensors):
            assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and np.array_equal(a.data, b.data)
    for name, data, why in (("empty", b"", "empty file"), ("magic", b"GGML" + bytes(64), "magic"),
                            ("header", b"GGUF\x03\x00\x00\x00", "buffer of at least"),
                            ("big-endian", b"GGUF\x00\x00\x00\x03" + bytes(64), "big-endian"),
                            ("tensors", pathlib.Path(paths[1]).read_bytes()[:-64], "past the end of the file")):
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(data)
        with pytest.raises(ValueError, match=f"not a readable GGUF file .*{why}"):
            gguf_file.open_reader(str(bad))


def test_gguf_without_vocab_size_or_tokens(tmp_path, tiny_llama_state):
    """No llama.vocab_size and no tokenizer.ggml.tokens: the vocabulary comes from token_embd's shape."""
    path = str(tmp_path / "novocab.gguf")
    write_tiny_gguf(path, tiny_llama_state, QT.F32, vocab_size_key=False)
    source = gguf_file.load(path)
    assert source.tokenizer is None
    assert source.config.vocab_size == VOCAB
    assert source.config.tie_word_embeddings is False
    assert (source.config.hidden_size, source.config.num_key_value_heads, source.config.head_dim) == (256, 2, 64)


# ---- the real SmolLM2 GGUF --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm_home(tmp_path_factory):
    """An empty HOME, so the tokenizer cache (~/.cache/tuili/tokenizers) starts empty."""
    return tmp_path_factory.mktemp("home")


def spy_on_tokenizer_loads(monkeypatch) -> list:
    """Record the `gguf_file` argument of every AutoTokenizer.from_pretrained call (None: a folder)."""
    calls, original = [], AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs.get("gguf_file"))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    return calls


@pytest.fixture(scope="module")
def smollm_first_load(default_model_path, smollm_home):
    """tuili's source for the real GGUF, loaded with an empty tokenizer cache; and the tokenizer loads it made."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(smollm_home))
        calls = spy_on_tokenizer_loads(mp)
        source = gguf_file.load(default_model_path)
    return source, calls


def test_smollm_config_matches_hf(default_model_path, smollm_first_load):
    ours = smollm_first_load[0].config
    folder, name = os.path.split(default_model_path)
    theirs = AutoConfig.from_pretrained(folder, gguf_file=name)
    for field in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
                  "max_position_embeddings"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-6)
    assert rope_parameters(ours) == rope_parameters(theirs)
    # and the dummy shape of the same model agrees with the file
    shape = dummy.SHAPES["smollm2-135m"]
    for field in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings"):
        assert getattr(ours, field) == shape[field], field
    assert rope_parameters(ours)[0] == shape["rope_theta"]
    assert ours.rms_norm_eps == pytest.approx(shape["rms_norm_eps"], rel=1e-6)


TEXTS = ["Hello, world! How are you today?", "Café, naïve, Zürich, São Paulo — déjà vu.",
         "Emoji: 🦙🚀🇫🇷 and 👩‍💻", "def square(x):\n    return x ** 2  # ok\n\tprint({'a': [1, 2]})\n"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi, café? 🦙"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "def f(): pass"}]


def test_smollm_tokenizer_cached_equals_fresh(default_model_path, smollm_first_load, smollm_home, monkeypatch):
    folder, name = os.path.split(default_model_path)
    fresh = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    first, first_calls = smollm_first_load[0].tokenizer, smollm_first_load[1]
    assert first_calls == [name], "the first load converts the GGUF tokenizer (the cache was empty)"
    cache_root = smollm_home / ".cache" / "tuili" / "tokenizers"
    entries = os.listdir(cache_root)
    assert len(entries) == 1 and os.path.isfile(cache_root / entries[0] / "tokenizer_config.json")

    monkeypatch.setenv("HOME", str(smollm_home))
    calls = spy_on_tokenizer_loads(monkeypatch)
    second = gguf_file.load_tokenizer(default_model_path)
    assert calls == [None], "the second load reads the cache, without converting"
    assert os.listdir(cache_root) == entries

    (cache_root / entries[0] / "tokenizer.json").write_text("{")  # a damaged entry is converted and written again
    calls.clear()
    assert gguf_file.load_tokenizer(default_model_path).encode(TEXTS[0]) == fresh.encode(TEXTS[0])
    assert calls == [None, name] and os.listdir(cache_root) == entries  # (written aside, then renamed)
    calls.clear()
    gguf_file.load_tokenizer(default_model_path)
    assert calls == [None]

    for tok in (first, second):
        for text in TEXTS:
            ids = fresh.encode(text)
            assert tok.encode(text) == ids, text
            assert tok.decode(ids, skip_special_tokens=True) == fresh.decode(ids, skip_special_tokens=True) == text
        assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token) == (fresh.bos_token_id, fresh.eos_token_id,
                                                                      fresh.eos_token)
        assert tok.chat_template == fresh.chat_template and tok.chat_template
        for messages, gen in ((CHAT, True), (CHAT[:2], True), (CHAT[:3], False)):
            rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert rendered == fresh.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok.encode(rendered, add_special_tokens=False) == fresh.encode(rendered, add_special_tokens=False)
    assert "<|im_start|>user\nHi, café? 🦙<|im_end|>" in first.apply_chat_template(CHAT, tokenize=False)


# ---- HF folders -------------------------------------------------------------------------------------------
def test_sharded_safetensors_equal_single_file(tiny_models, tmp_path):
    single = tiny_models["llama"]
    sharded = str(tmp_path / "sharded")
    AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32).save_pretrained(sharded, max_shard_size="64KB")
    assert len(glob.glob(os.path.join(single, "*.safetensors"))) == 1
    assert len(glob.glob(os.path.join(sharded, "*.safetensors"))) >= 3
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))

    a = LLM(single, dtype="float32", kv_cache_memory=0.01)
    b = LLM(sharded, dtype="float32", kv_cache_memory=0.01)
    wa, wb = a.engine.model.state_dict(), b.engine.model.state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    prompt = PROMPT[:20]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=5)
    out_a, out_b = (llm.generate(prompt, params, use_tqdm=False)[0] for llm in (a, b))
    assert out_a.outputs[0].token_ids == out_b.outputs[0].token_ids
    assert len(out_a.outputs[0].token_ids) == 24
    for ea, eb in zip(out_a.prompt_logprobs[1:], out_b.prompt_logprobs[1:]):
        assert {t: lp.logprob for t, lp in ea.items()} == {t: lp.logprob for t, lp in eb.items()}


@pytest.mark.parametrize("removed", [
    "model.layers.1.mlp.down_proj.weight",
    "model.norm.weight",
    "model.layers.0.self_attn.k_proj.weight",  # one shard of the fused qkv_proj
    "model.layers.0.mlp.up_proj.weight",       # one shard of the fused gate_up_proj
])
def test_missing_tensor_fails_naming_it(tiny_models, tmp_path, removed):
    path = str(tmp_path / "broken")
    shutil.copytree(tiny_models["llama"], path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors[removed]
    save_file(tensors, file, metadata={"format": "pt"})
    try:
        LLM(path, dtype="float32", kv_cache_memory=0.01)
    except ValueError as e:
        short = removed.removeprefix("model.")
        fused = short.replace("k_proj", "qkv_proj").replace("up_proj", "gate_up_proj")
        assert short in str(e) or fused in str(e), str(e)
    else:
        raise AssertionError(f"loading a checkpoint without {removed} did not fail")


# ---- dummy weights ----------------------------------------------------------------------------------------
EXPECTED_PARAMS = {"llama-3.1-8b": 8.03e9, "llama-3.2-1b": 1.24e9, "qwen3-0.6b": 0.60e9, "qwen2.5-7b": 7.6e9,
                   "smollm2-135m": 1.35e8}


def test_every_dummy_shape_has_an_expected_size():
    assert set(dummy.SHAPES) == set(EXPECTED_PARAMS)


@pytest.mark.parametrize("shape", sorted(EXPECTED_PARAMS))
def test_dummy_shape_builds_with_expected_size(shape):
    config = dummy.config_for_shape(shape)
    with torch.device("meta"):
        model = build_model(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(EXPECTED_PARAMS[shape], rel=0.01)
    assert (model.lm_head is None) == dummy.SHAPES[shape]["tie_word_embeddings"]
    assert len(model.layers) == dummy.SHAPES[shape]["num_hidden_layers"]


def test_dummy_smollm_generates_from_token_ids():
    llm = LLM("smollm2-135m", load_format="dummy", dtype="float32", kv_cache_memory=0.05)
    model = llm.engine.model
    assert llm.get_tokenizer() is None
    assert model.embed_tokens.weight.shape == (49152, 576) and model.lm_head is None
    assert torch.equal(model.norm.weight, torch.ones(576))
    assert float(model.layers[0].mlp.down_proj.weight.std()) == pytest.approx(0.02, rel=0.05)
    out = llm.generate([1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 2 and all(0 <= t < 49152 for t in out.token_ids)
    assert out.finish_reason == "length"
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello", use_tqdm=False)
    assert llm.engine.block_manager.num_used_blocks == 0


def test_dummy_same_seed_same_weights(tiny_models):
    """Dummy weights in the shape of a config.json folder: a seed fixes them, another seed changes them."""
    path = os.path.join(tiny_models["llama"], "config.json")
    states = [LLM(path, load_format="dummy", dtype="float32", kv_cache_memory=0.01, seed=seed).engine.model
              .state_dict() for seed in (7, 7, 8)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    qkv = "layers.0.self_attn.qkv_proj.weight"
    assert not torch.equal(states[0][qkv], states[2][qkv])
    real = load_file(os.path.join(tiny_models["llama"], "model.safetensors"))
    assert not torch.equal(states[0]["embed_tokens.weight"], real["model.embed_tokens.weight"])
