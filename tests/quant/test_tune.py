"""End-to-end tuning of scales and offsets (tuili/quant/tune.py, `tuili quantize --tune-steps`)."""
from __future__ import annotations

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
    default model, in test_gptq.py's test_quantize_gptq_and_tuning_write_checkpoints_with_lower_perplexity); the
    codes are round-to-nearest's, every scale moved, offsets stay where the format has them."""
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


@pytest.mark.parametrize("form", ["int4 offsets", "int4 symmetric", "int8 per channel"])
def test_dequant_linear_gradients_equal_autograd_of_the_plain_weight(form):
    """The tuning's linear (the weight made again in the backward, not saved) gives the gradients autograd gives
    through the plain dequantized weight; 200 inputs in groups of 64 leave a short last group."""
    from tuili.quant.tune import _dequantize, _DequantLinear

    g = torch.Generator().manual_seed(0)
    n, k, size = 24, 200, 64 if form.startswith("int4") else 200
    groups = -(-k // size)
    codes = torch.randint(0, 16, (n, groups, size), generator=g, dtype=torch.uint8) if form.startswith("int4") \
        else torch.randint(-127, 128, (n, groups, size), generator=g, dtype=torch.int8)
    s = torch.rand(n, groups, generator=g).add(0.5).requires_grad_()
    o = torch.randn(n, groups, generator=g).requires_grad_() if form == "int4 offsets" else None
    code_offset = 8.0 if form == "int4 symmetric" else 0.0
    x = torch.randn(3, 5, k, generator=g, requires_grad=True)
    up = torch.randn(3, 5, n, generator=g)
    grads = []
    for fn in (lambda: F.linear(x, _dequantize(codes, s, o, k, code_offset)),
               lambda: _DequantLinear.apply(x, codes, s, o, k, code_offset)):
        y = fn()
        inputs = [x, s] + ([o] if o is not None else [])
        grads.append((y, torch.autograd.grad(y, inputs, up)))
    (want_y, want), (got_y, got) = grads
    torch.testing.assert_close(got_y, want_y)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_tuning_rejects_bad_arguments(tiny_models):
    model, _ = load_float_model(tiny_models["llama"], torch.device("cpu"))
    windows = torch.randint(0, 512, (2, 16))
    teacher = teacher_logprobs(model, windows)
    with pytest.raises(ValueError, match="at least one step"):
        tune_model(model, QuantConfig("int8"), {}, windows, teacher, steps=0)
    with pytest.raises(ValueError, match="do not match the windows"):
        tune_model(model, QuantConfig("int8"), {}, windows[:1], teacher, steps=1)


def test_quantize_tune_steps_errors(tiny_models, tmp_path, capsys):
    from tuili.cli import main

    args = ["quantize", "--model", tiny_models["llama"], "--method", "int4", "--out", str(tmp_path)]
    for extra, message in ((["--tune-steps", "-1"], "--tune-steps must be >= 0"),
                           (["--tune-steps", "2", "--tune-lr", "0"], "--tune-lr must be > 0"),
                           (["--tune-steps", "2"], "the model has no tokenizer")):
        assert main([*args, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)
