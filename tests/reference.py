"""HF transformers as the reference: random models of a family, greedy decoding, log-softmax of its logits."""
from __future__ import annotations

import torch


@torch.no_grad()
def random_hf_model(model_type: str, seed: int = 0, **config):
    """A randomly initialised HF model (fp32). HF's init leaves norms at 1 and biases at 0: they are randomised
    too, so that their loading is tested."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.float32)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.add_(torch.randn_like(p) * 0.1)
        elif name.endswith("bias"):
            p.normal_(0, 0.1)
    return model


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation with HF's KV cache, never stopping early (EOS is just a token)."""
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    tokens = []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


@torch.no_grad()
def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of HF's logits at every position of `ids`: [len, vocab]."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
