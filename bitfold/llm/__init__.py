"""Decoder language models: config → KV-cache graph (weights streamed from safetensors or GGUF), generation,
perplexity on any text. See :mod:`bitfold.llm.graph` for the graph interface."""

from bitfold.llm.config import LLMConfig
from bitfold.llm.export import export_llm, write_llm

__all__ = ["LLMConfig", "export_llm", "write_llm"]
