"""tuili (推理): an LLM inference engine for decoder-only transformers."""
from tuili.config import EngineArgs
from tuili.engine.llm import LLM
from tuili.engine.llm_engine import LLMEngine
from tuili.engine.outputs import CompletionOutput, RequestOutput
from tuili.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
