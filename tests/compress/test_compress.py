"""`tuili prune` and `tuili distill` on a small random Llama with a word-level tokenizer over the shipped prose."""
from __future__ import annotations

import collections
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tuili import LLM, SamplingParams
from tuili.bench.perplexity import DEFAULT_TEXT
from tuili.cli import build_parser
from tuili.compress.common import load_float_model
from tuili.compress.distill import Distiller, run_distill
from tuili.compress.prune import count_params, run_prune

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-6,
             tie_word_embeddings=True)


def make_model(path: str, vocab_size: int = 512, model_type: str = "llama", **overrides) -> str:
    """A random HF model (Llama unless said) plus a word-level tokenizer of the prose's most frequent words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from reference import random_hf_model

    random_hf_model(model_type, **{**SMALL, "vocab_size": vocab_size, **overrides}).save_pretrained(path)
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        words = collections.Counter(f.read().split()).most_common(vocab_size - 1)
    vocab = {w: i for i, (w, _) in enumerate(words)}
    vocab["<unk>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    return make_model(str(tmp_path_factory.mktemp("teacher")))


def cli(*argv: str) -> int:
    ns = build_parser().parse_args(list(argv))
    return run_prune(ns) if ns.command == "prune" else run_distill(ns)


def logits(path: str, ids: list[int]) -> torch.Tensor:
    """Every position's logits, from tuili's model loaded in fp32."""
    from tuili.compress.common import forward

    model, _ = load_float_model(path, torch.device("cpu"))
    with torch.no_grad():
        return model.compute_logits(forward(model, torch.tensor([ids])))


def saved_params(path: str) -> int:
    return sum(t.numel() for t in load_file(os.path.join(path, "model.safetensors")).values())


PROMPT = list(range(3, 40, 3))


def test_prune_nothing_is_bit_identical(teacher, tmp_path):
    out = str(tmp_path / "same")
    cli("prune", "--model", teacher, "--out", out, "--ratio", "1.0", "--calibration-tokens", "512", "--window", "64")
    assert saved_params(out) == saved_params(teacher) == count_params(json_config(teacher))
    assert torch.equal(logits(out, PROMPT), logits(teacher, PROMPT))


def json_config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


@pytest.mark.parametrize("ratio", [0.8, 0.5])
def test_prune_to_a_ratio_gives_that_size(teacher, tmp_path, ratio):
    out = str(tmp_path / "pruned")
    cli("prune", "--model", teacher, "--out", out, "--ratio", str(ratio), "--calibration-tokens", "512",
        "--window", "64")
    total, target = saved_params(teacher), ratio * saved_params(teacher)
    assert saved_params(out) == count_params(json_config(out))
    assert abs(saved_params(out) - target) / total < 0.02, (saved_params(out), target)
    config = json_config(out)
    # by default from depth (half the cut, in whole layers) and MLP width; kv heads and hidden untouched
    assert config.intermediate_size < 128 and (config.num_key_value_heads, config.hidden_size) == (2, 64)
    assert config.num_hidden_layers == (4 if ratio == 0.8 else 3)


def test_prune_explicit_sizes_loads_in_tuili_and_hf(teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    from reference import hf_logprobs

    out = str(tmp_path / "small")
    cli("prune", "--model", teacher, "--out", out, "--num-layers", "3", "--intermediate-size", "80",
        "--num-kv-heads", "1", "--hidden-size", "48", "--calibration-tokens", "512", "--window", "64")
    config = json_config(out)
    assert (config.num_hidden_layers, config.intermediate_size, config.num_key_value_heads,
            config.num_attention_heads, config.hidden_size, config.head_dim) == (3, 80, 1, 2, 48, 16)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = hf_logprobs(hf, PROMPT)
    llm = LLM(out, dtype="float32", kv_cache_memory=0.01)
    outs = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=20), use_tqdm=False)[0]
    for pos, entry in enumerate(outs.prompt_logprobs[1:]):
        assert len(entry) >= 20
        for token, lp in entry.items():
            assert lp.logprob == pytest.approx(float(ref[pos, token]), abs=1e-4)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_prune_qwen_keeps_a_loadable_config(tmp_path, model_type):
    """Qwen configs list a type per layer: the pruned one lists the kept layers' (HF checks the count)."""
    from transformers import AutoModelForCausalLM

    teacher = make_model(str(tmp_path / "qwen"), model_type=model_type, head_dim=16)
    out = str(tmp_path / "pruned")
    cli("prune", "--model", teacher, "--out", out, "--ratio", "0.6", "--calibration-tokens", "256", "--window", "64")
    assert saved_params(out) == count_params(json_config(out))
    AutoModelForCausalLM.from_pretrained(out)
    LLM(out, dtype="float32", kv_cache_memory=0.01).generate(PROMPT, SamplingParams(max_tokens=2), use_tqdm=False)


def test_prune_bad_arguments_fail_clearly(teacher, tmp_path):
    total = saved_params(teacher)
    with pytest.raises(ValueError, match="not in"):
        cli("prune", "--model", teacher, "--out", str(tmp_path / "x"), "--target-params", str(total + 1))
    with pytest.raises(ValueError, match="--num-layers must be in"):
        cli("prune", "--model", teacher, "--out", str(tmp_path / "x"), "--num-layers", "9")
    with pytest.raises(ValueError, match="--ratio must be in"):
        cli("prune", "--model", teacher, "--out", str(tmp_path / "x"), "--ratio", "1.5")
    with pytest.raises(ValueError, match="explicit sizes leave"):
        cli("prune", "--model", teacher, "--out", str(tmp_path / "x"), "--ratio", "0.3", "--num-layers", "4",
            "--intermediate-size", "128")


DISTILL = ["--seq-len", "32", "--batch-size", "4", "--lr", "3e-3", "--warmup", "2"]


def test_distill_lowers_kl_and_resumes_on_the_same_curve(teacher, tmp_path):
    student = str(tmp_path / "student")
    cli("prune", "--model", teacher, "--out", student, "--num-layers", "2", "--intermediate-size", "64",
        "--calibration-tokens", "512", "--window", "64")
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    cli("distill", "--teacher", teacher, "--student", student, "--out", full, "--steps", "12", *DISTILL)
    report = json.load(open(os.path.join(full, "distill.json")))
    first, last = report["evals"][0], report["evals"][-1]
    assert last["val_kl"] < 0.8 * first["val_kl"], (first, last)
    assert os.path.isfile(os.path.join(full, "loss.png"))
    # the distilled folder is a model tuili loads
    LLM(full, dtype="float32", kv_cache_memory=0.01).generate(PROMPT, SamplingParams(max_tokens=2), use_tqdm=False)

    # the same 12 steps in two runs: one interrupted after its checkpoint at step 6, then --resume
    ns = build_parser().parse_args(["distill", "--teacher", teacher, "--student", student, "--out", split,
                                    "--steps", "12", "--checkpoint-every", "6", *DISTILL])
    Distiller(ns, torch.device("cpu")).run(stop_at=6)
    assert torch.load(os.path.join(split, "checkpoint.pt"), weights_only=False)["step"] == 6
    cli("distill", "--teacher", teacher, "--student", student, "--out", split, "--steps", "12", "--resume", *DISTILL)
    resumed = json.load(open(os.path.join(split, "distill.json")))
    assert len(resumed["train_kl"]) == 12
    torch.testing.assert_close(torch.tensor(resumed["train_kl"]), torch.tensor(report["train_kl"]), rtol=1e-4,
                               atol=1e-5)
    with pytest.raises(ValueError, match="other settings than the checkpoint's: lr"):
        cli("distill", "--teacher", teacher, "--student", student, "--out", split, "--steps", "12", "--resume",
            *DISTILL, "--lr", "1e-2")


def test_distill_on_text_the_teacher_writes(teacher, tmp_path):
    student = str(tmp_path / "student")
    cli("prune", "--model", teacher, "--out", student, "--ratio", "0.5", "--calibration-tokens", "256",
        "--window", "64")
    out = str(tmp_path / "out")
    cli("distill", "--teacher", teacher, "--student", student, "--out", out, "--steps", "3", "--generate", "24",
        *DISTILL)
    report = json.load(open(os.path.join(out, "distill.json")))
    assert len(report["train_kl"]) == 3 and report["evals"][-1]["step"] == 3


def test_distill_refuses_a_student_with_another_vocabulary(teacher, tmp_path):
    other = make_model(str(tmp_path / "other"), vocab_size=256)
    with pytest.raises(ValueError, match="vocabulary"):
        cli("distill", "--teacher", teacher, "--student", other, "--out", str(tmp_path / "x"), "--steps", "1")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        cli("distill", "--teacher", teacher, "--student", teacher, "--out", str(tmp_path / "y"), "--steps", "1",
            "--resume")


def test_float_model_is_differentiable(teacher):
    """Distillation trains tuili's own model classes: gradients reach every parameter."""
    from tuili.compress.common import forward

    model, _ = load_float_model(teacher, torch.device("cpu"))
    for p in model.parameters():
        p.requires_grad_(True)
    hidden = forward(model, torch.tensor([PROMPT, PROMPT[::-1]]))
    model.compute_logits(hidden).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
