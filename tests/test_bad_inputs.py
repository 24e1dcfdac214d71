"""Every bad input gives a clear error and breaks nothing else: parameters, prompts, requests, model files."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tuili import LLM
from tuili.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6)
GOOD_PROMPT = "The quick brown fox"


# ---- SamplingParams -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=-2), "top_k"),
    (dict(n=0), "n"),
    (dict(n=-1), "n"),
    (dict(min_p=1.5), "min_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(logprobs=-1), "logprobs"),
    (dict(prompt_logprobs=-2), "prompt_logprobs"),
])
def test_sampling_params_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b") as info:
        SamplingParams(**kwargs)
    assert str(list(kwargs.values())[0]) in str(info.value) or field in ("stop", "min_tokens")


def test_sampling_params_accept_the_edges():
    p = SamplingParams(max_tokens=1, temperature=0, top_p=1.0, top_k=-1, n=1, min_p=1.0)
    assert p.greedy and p.stop == [] and p.stop_token_ids == []
    assert SamplingParams(top_k=1, top_p=1e-9, stop="x").stop == ["x"]
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None


# ---- prompts -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(smollm):
    """The greedy answer to GOOD_PROMPT on a clean engine."""
    return smollm.generate(GOOD_PROMPT, GREEDY, use_tqdm=False)[0].outputs[0]


def assert_engine_still_fine(llm, reference):
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_used_blocks == 0
    out = llm.generate(GOOD_PROMPT, GREEDY, use_tqdm=False)[0].outputs[0]
    assert out.text == reference.text and out.token_ids == reference.token_ids


def test_empty_prompts(smollm, reference):
    for prompt in ("", []):
        with pytest.raises(ValueError, match="prompt is empty"):
            smollm.generate([prompt], GREEDY, use_tqdm=False)
        with pytest.raises(ValueError, match="prompt is empty"):
            smollm.engine.add_request(None, prompt, GREEDY)
        assert_engine_still_fine(smollm, reference)
    with pytest.raises(ValueError, match="no prompts"):
        smollm.generate([], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="conversation is empty"):
        smollm.chat([[]], GREEDY, use_tqdm=False)
    assert_engine_still_fine(smollm, reference)


def test_prompt_longer_than_max_model_len(smollm, reference):
    engine = smollm.engine
    limit = engine.max_model_len
    for length in (limit, limit + 1):
        with pytest.raises(ValueError, match=rf"{length} tokens.*max_model_len is {limit}"):
            smollm.generate([[1] * length], GREEDY, use_tqdm=False)
    assert_engine_still_fine(smollm, reference)


@pytest.mark.parametrize("bad", [[49152], [1, 2, -1], [1, 10**9], [1, 2.0], [1, "2"], [None]],
                         ids=["vocab", "negative", "huge", "float", "str", "none"])
def test_token_ids_out_of_vocabulary(smollm, reference, bad):
    vocab = smollm.engine.model_config.vocab_size
    assert vocab == 49152
    with pytest.raises(ValueError, match=rf"token ids must be ints in \[0, {vocab}\)"):
        smollm.generate([bad], GREEDY, use_tqdm=False)
    assert_engine_still_fine(smollm, reference)


def test_a_bad_prompt_in_a_batch_submits_nothing(smollm, reference):
    with pytest.raises(ValueError, match="prompt is empty"):
        smollm.generate([GOOD_PROMPT, "Hello", ""], GREEDY, use_tqdm=False)
    assert_engine_still_fine(smollm, reference)
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        smollm.generate([GOOD_PROMPT, "a", "b"], [GREEDY, GREEDY], use_tqdm=False)
    with pytest.raises(TypeError, match="SamplingParams"):
        smollm.engine.add_request(None, GOOD_PROMPT, {"temperature": 0})
    assert_engine_still_fine(smollm, reference)


# ---- an error in one request must not stop the others -----------------------------------------------------
def run_to_end(engine, ids: set[str], abort_after: dict[str, int] | None = None, on_step=None):
    """Step until every id in `ids` has finished or been aborted; return the final output of each finisher."""
    final, steps = {}, 0
    try:
        while engine.has_unfinished_requests():
            steps += 1
            assert steps < 200, "the engine does not make progress"
            for request_id, at in (abort_after or {}).items():
                if steps == at:
                    engine.abort_request(request_id)
            if on_step is not None:
                on_step(steps)
            for out in engine.step():
                assert out.request_id in ids
                assert out.request_id not in final, "output after the request finished"
                if out.finished:
                    final[out.request_id] = out
    finally:
        for request_id in ids:
            engine.abort_request(request_id)
    return final


PROMPTS = {"bad-inputs-a": ("Once upon a time", SamplingParams(temperature=0, max_tokens=10)),
           "bad-inputs-b": ("The capital of France is", SamplingParams(temperature=0, max_tokens=12)),
           "bad-inputs-c": ("def fibonacci(n):", SamplingParams(temperature=0, max_tokens=8, stop=["\n\n"]))}


@pytest.fixture(scope="module")
def alone(smollm):
    return {rid: smollm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
            for rid, (prompt, params) in PROMPTS.items()}


def test_bad_request_does_not_disturb_running_ones(smollm, alone):
    engine = smollm.engine
    ids = set(PROMPTS)
    engine.add_request("bad-inputs-a", *PROMPTS["bad-inputs-a"])
    engine.add_request("bad-inputs-b", *PROMPTS["bad-inputs-b"])
    errors = []

    def bad_adds(step):
        if step == 3:
            for prompt in ("", [], [49152], [0] * engine.max_model_len):
                with pytest.raises(ValueError) as info:
                    engine.add_request("bad-inputs-x", prompt, GREEDY)
                errors.append(str(info.value))
            with pytest.raises(ValueError, match="already in use"):
                engine.add_request("bad-inputs-a", "Hello", GREEDY)
            with pytest.raises(ValueError, match="top_p"):
                engine.add_request("bad-inputs-x", "Hello", SamplingParams(top_p=0))
            assert engine.get_num_unfinished_requests() == 2
            engine.add_request("bad-inputs-c", *PROMPTS["bad-inputs-c"])   # a good one joins after the errors

    final = run_to_end(engine, ids, on_step=bad_adds)
    assert len(errors) == 4 and all(errors)
    assert set(final) == ids
    for rid, out in final.items():
        assert out.error is None
        assert out.outputs[0].text == alone[rid].text, rid
        assert out.outputs[0].token_ids == alone[rid].token_ids, rid
        assert out.outputs[0].finish_reason == alone[rid].finish_reason
    assert engine.block_manager.num_used_blocks == 0
    assert "bad-inputs-x" not in engine.requests


def test_abort_midway_leaves_the_others_and_no_blocks(smollm, alone):
    engine = smollm.engine
    ids = set(PROMPTS) | {"bad-inputs-waiting"}
    for rid, (prompt, params) in PROMPTS.items():
        engine.add_request(rid, prompt, params)
    engine.add_request("bad-inputs-waiting", GOOD_PROMPT, GREEDY)
    engine.abort_request("bad-inputs-waiting")          # aborted before it ever ran
    engine.abort_request("no-such-request")             # unknown ids are ignored
    assert engine.get_num_unfinished_requests() == 3
    final = run_to_end(engine, ids, abort_after={"bad-inputs-b": 4})
    assert set(final) == {"bad-inputs-a", "bad-inputs-c"}
    for rid in final:
        assert final[rid].outputs[0].text == alone[rid].text
        assert final[rid].outputs[0].token_ids == alone[rid].token_ids
    engine.abort_request("bad-inputs-b")                # aborting twice is harmless
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.has_unfinished()
    assert engine.block_manager.num_used_blocks == 0


def test_abort_n_greater_than_one_frees_every_sequence(smollm, reference):
    engine = smollm.engine
    engine.add_request("bad-inputs-n", GOOD_PROMPT, SamplingParams(n=3, temperature=1.0, max_tokens=20))
    engine.step()
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    engine.abort_request("bad-inputs-n")
    assert engine.block_manager.num_used_blocks == 0
    assert engine.step() == []
    assert_engine_still_fine(smollm, reference)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_logprobs_beyond_the_vocabulary(smollm, reference, field):
    """More logprobs than the vocabulary has: refused at add_request (or failing that request alone), never
    an exception out of every later step() that stops all the other requests."""
    engine = smollm.engine
    bad = SamplingParams(temperature=0, max_tokens=3, **{field: engine.model_config.vocab_size + 1})
    good = SamplingParams(temperature=0, max_tokens=4)
    good_alone = smollm.generate("Once upon a time", good, use_tqdm=False)[0].outputs[0]
    engine.add_request("bad-inputs-good", "Once upon a time", good)
    try:
        try:
            engine.add_request("bad-inputs-lp", "The capital of France is", bad)
        except ValueError as e:
            assert field in str(e)
            ids = {"bad-inputs-good"}
        else:
            ids = {"bad-inputs-good", "bad-inputs-lp"}
        try:
            final = run_to_end(engine, ids)
        except RuntimeError as e:
            pytest.fail(f"{field}={bad.logprobs or bad.prompt_logprobs} was accepted by add_request, then every "
                        f"step() raised {e!r}: no request in the engine can finish")
        assert final["bad-inputs-good"].outputs[0].token_ids == good_alone.token_ids
        if "bad-inputs-lp" in final:
            assert final["bad-inputs-lp"].error and final["bad-inputs-lp"].outputs[0].finish_reason == "error"
    finally:
        engine.abort_request("bad-inputs-good")
        engine.abort_request("bad-inputs-lp")
    assert_engine_still_fine(smollm, reference)


# ---- a small engine: max_model_len at the boundary ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import AutoConfig

    path = tmp_path_factory.mktemp("tiny-dummy")
    AutoConfig.for_model("llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                         max_position_embeddings=512).save_pretrained(path)
    return str(path)


def test_max_model_len_boundary_on_a_small_engine(tiny_dir):
    llm = LLM(tiny_dir, load_format="dummy", dtype="float32", max_model_len=32, kv_cache_memory=0.01)
    engine = llm.engine
    assert engine.max_model_len == 32
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    ref = llm.generate([list(range(1, 21))], params, use_tqdm=False)[0].outputs[0]
    assert len(ref.token_ids) == 12 and ref.finish_reason == "length"   # runs up to max_model_len
    for length in (32, 40):
        with pytest.raises(ValueError, match="max_model_len is 32"):
            llm.generate([list(range(1, length + 1))], params, use_tqdm=False)
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        llm.generate([[1, 512]], params, use_tqdm=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("text needs a tokenizer", params, use_tqdm=False)
    edge = llm.generate([list(range(1, 32))], params, use_tqdm=False)[0].outputs[0]
    assert len(edge.token_ids) == 1 and edge.finish_reason == "length"
    again = llm.generate([list(range(1, 21))], params, use_tqdm=False)[0].outputs[0]
    assert again.token_ids == ref.token_ids
    assert engine.block_manager.num_used_blocks == 0


def test_bad_engine_arguments(tiny_dir):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLM(tiny_dir, load_format="dummy", max_model_len=10_000)
    with pytest.raises(TypeError, match="unknown engine argument"):
        LLM(tiny_dir, load_format="dummy", max_len=32)
    with pytest.raises(ValueError, match="dtype"):
        LLM(tiny_dir, load_format="dummy", dtype="float8")
    with pytest.raises(ValueError, match="load_format"):
        LLM(tiny_dir, load_format="pickle")
    with pytest.raises(ValueError, match="block_size"):
        LLM(tiny_dir, load_format="dummy", block_size=12)
    with pytest.raises(ValueError, match="neither a known shape"):
        LLM("no-such-shape", load_format="dummy")


# ---- loaders ------------------------------------------------------------------------------------------------
def test_unknown_model_path(tmp_path):
    from tuili.loader import load_model_source

    missing = str(tmp_path / "nowhere" / "model.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_source(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(missing)


def test_file_that_is_not_gguf(tmp_path):
    from tuili.loader import load_model_source

    path = tmp_path / "x.gguf"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_model_source(str(path))
    with pytest.raises(ValueError, match="GGUF"):
        LLM(str(path))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="GGUF"):
        load_model_source(str(empty))


def test_truncated_gguf(tmp_path, default_model_path):
    from tuili.loader import load_model_source

    path = tmp_path / "truncated.gguf"
    with open(default_model_path, "rb") as f:
        path.write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError, match="GGUF.*(truncated|corrupt)"):
        load_model_source(str(path))
    with pytest.raises(ValueError, match="GGUF"):
        LLM(str(path))


def test_folder_without_config(tmp_path):
    from tuili.loader.hf_folder import load

    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(tmp_path))


def test_folder_with_bad_config_or_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="cannot read"):
        LLM(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(tmp_path))


def gpt2_folder(path) -> str:
    from safetensors.torch import save_file
    from transformers import AutoConfig

    AutoConfig.for_model("gpt2", architectures=["GPT2LMHeadModel"], n_layer=1, n_embd=32, n_head=2,
                         vocab_size=100).save_pretrained(path)
    save_file({"wte.weight": torch.zeros(100, 32)}, os.path.join(path, "model.safetensors"))
    return str(path)


def test_unsupported_architecture(tmp_path):
    from transformers import AutoConfig

    from tuili.models.registry import SUPPORTED_ARCHITECTURES, build_model

    folder = gpt2_folder(tmp_path)
    config = AutoConfig.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM") as info:
        build_model(config)
    assert all(arch in str(info.value) for arch in SUPPORTED_ARCHITECTURES)
    with pytest.raises(ValueError, match=r"unsupported model architecture.*Qwen3ForCausalLM"):
        LLM(folder, dtype="float32")
    config.architectures = None
    with pytest.raises(ValueError, match=r"none given.*LlamaForCausalLM"):
        build_model(config)


def test_loader_errors_leave_the_loaded_engine_working(smollm, reference, tmp_path):
    (tmp_path / "x.gguf").write_bytes(os.urandom(1024))
    with pytest.raises(ValueError):
        LLM(str(tmp_path / "x.gguf"))
    assert_engine_still_fine(smollm, reference)
