"""HF transformers as the reference: greedy decoding and log-softmax of its logits."""
from __future__ import annotations

import torch


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
