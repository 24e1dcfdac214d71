"""End-to-end tuning of scales and offsets (tuili/quant/tune.py, `tuili quantize --tune-steps`)."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from tuili.compress.common import forward, load_float_model
from tuili.quant import QuantConfig, quantize_model
from tuili.quant.tune import teacher_logprobs, tune_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # on a GPU machine the CUDA path


def _kl(model, windows: torch.Tensor, teacher: torch.Tensor) -> float:
    with torch.no_grad():
        logprobs = F.log_softmax(model.compute_logits(forward(model, windows).flatten(0, 1)).float(), -1)
    return F.kl_div(logprobs, teacher.flatten(0, 1).float(), log_target=True, reduction="batchmean").item()


@pytest.mark.parametrize("qc", [QuantConfig("int4", 32), QuantConfig("int4", 64, symmetric=True),
                                QuantConfig("int8")], ids=str)
def test_tuning_lowers_the_kl_divergence_with_the_codes_unchanged(tiny_models, qc):
    """Rounded to nearest, then tuned: the KL divergence from the float model on the calibration windows falls
    (a random model has little that carries over to other text: the gain on unseen text is measured on the
    default model, test_quantize_tune_steps_lowers_perplexity_on_unseen_text); the codes are round-to-nearest's,
    every scale moved, offsets stay where the format has them."""
    def load():
        model, _ = load_float_model(tiny_models["llama"], DEVICE)
        with torch.no_grad():
            model.norm.weight.mul_(30.0)  # confident predictions, as a trained model makes (random ones are flat)
        return model

    model, nearest = load(), load()
    calibration = torch.randint(0, 512, (64, 64), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    teacher = teacher_logprobs(model, calibration)
    assert teacher.shape == (64, 64, 512) and teacher.dtype == torch.float16
    quantize_model(nearest, qc)
    done = tune_model(model, qc, {}, calibration, teacher, steps=40, dtype=torch.float32, show_progress=False)
    assert len(done) == 2 * 4 + 1  # every linear of both decoder layers and the LM head
    quantize_model(model, qc, done)
    for name, module in model.named_modules():
        if getattr(module, "qweight", None) is not None:
            rounded = nearest.get_submodule(name)
            assert torch.equal(module.qweight, rounded.qweight), name
            assert not torch.equal(module.scales, rounded.scales), name
            assert (module.offsets is None) == (rounded.offsets is None)
    before, after = _kl(nearest, calibration, teacher), _kl(model, calibration, teacher)
    assert after < (0.9 if qc.method == "int4" else 0.99) * before, (before, after)


def test_tuning_rejects_bad_arguments(tiny_models):
    model, _ = load_float_model(tiny_models["llama"], torch.device("cpu"))
    windows = torch.randint(0, 512, (2, 16))
    teacher = teacher_logprobs(model, windows)
    with pytest.raises(ValueError, match="at least one step"):
        tune_model(model, QuantConfig("int8"), {}, windows, teacher, steps=0)
    with pytest.raises(ValueError, match="do not match the windows"):
        tune_model(model, QuantConfig("int8"), {}, windows[:1], teacher, steps=1)


def test_quantize_tune_steps_lowers_perplexity_on_unseen_text(default_model_path, tmp_path):
    """`tuili quantize --tune-steps` on the default model, from INT4 g128 rounded to nearest (tuned on the prose's
    last tokens): perplexity on its first tokens, which tuning did not see, falls; the config says how the
    weights were made."""
    from tuili import LLM
    from tuili.bench.perplexity import DEFAULT_TEXT, perplexity
    from tuili.cli import main

    args = ["quantize", "--model", default_model_path, "--method", "int4", "--dtype", "float32"]
    assert main([*args, "--out", str(tmp_path / "nearest")]) == 0
    assert main([*args, "--tune-steps", "4", "--tune-lr", "1e-3", "--calibration-tokens", "1024",
                 "--out", str(tmp_path / "tuned")]) == 0
    with open(tmp_path / "tuned" / "config.json") as f:
        rounding = json.load(f)["quantization_config"]["rounding"]
    assert rounding.startswith("to nearest + scales and offsets tuned end to end for 4 steps"), rounding
    ppl = {}
    for name in ("nearest", "tuned"):
        llm = LLM(str(tmp_path / name), dtype="float32", kv_cache_memory=0.1)
        assert llm.engine.quantization == "int4 (group 128, offsets)"  # the checkpoint's, as reports name it
        with open(DEFAULT_TEXT) as f:
            ids = llm.get_tokenizer().encode(f.read()[:8000], add_special_tokens=False)[:1024]
        ppl[name] = perplexity(llm, ids, 512)[0]
        del llm
    assert ppl["tuned"] < 0.92 * ppl["nearest"], ppl  # 26.0 -> 22.5 here; 1e-2 makes it worse: 35.7


def test_quantize_tune_steps_errors(tiny_models, tmp_path, capsys):
    from tuili.cli import main

    args = ["quantize", "--model", tiny_models["llama"], "--method", "int4", "--out", str(tmp_path)]
    for extra, message in ((["--tune-steps", "-1"], "--tune-steps must be >= 0"),
                           (["--tune-steps", "2"], "the model has no tokenizer")):
        assert main([*args, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)
