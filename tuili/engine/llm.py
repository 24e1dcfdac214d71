"""LLM: offline batched generation and chat, with a progress bar (the vLLM-style entry point)."""
from __future__ import annotations

from collections.abc import Sequence as Seq

from tuili.config import EngineArgs
from tuili.engine.llm_engine import LLMEngine
from tuili.engine.outputs import RequestOutput
from tuili.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


def encode_chat(tokenizer, conversation: list[Message], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation formatted with the model's chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; use a plain prompt")
    if not conversation:
        raise ValueError("conversation is empty")
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False)


class LLM:
    """`LLM(model=..., **engine_args)`; `generate` and `chat` run all requests together under continuous batching."""

    def __init__(self, model: str | None = None, **engine_args) -> None:
        self.engine = LLMEngine(EngineArgs.from_kwargs(model=model, **engine_args), show_progress=True)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for one prompt or a list (strings or token-id lists); outputs come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        return self._run(prompts, params, use_tqdm)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, formatted with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.encode_chat(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def encode_chat(self, conversation: list[Message], add_generation_prompt: bool = True) -> list[int]:
        return encode_chat(self.engine.tokenizer, conversation, add_generation_prompt)

    def _run(self, prompts: list[Prompt], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(engine.add_request(None, prompt, p))
        except Exception:
            for request_id in ids:  # all or nothing: a bad prompt leaves no half-submitted batch behind
                engine.abort_request(request_id)
            raise
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generating", unit=" req", dynamic_ncols=True)
        try:
            while len(results) < len(ids):
                for out in engine.step(finished_only=True):
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[i] for i in ids]
