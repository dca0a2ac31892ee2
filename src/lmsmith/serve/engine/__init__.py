"""The inference engine behind `lmsmith serve` and `lmsmith chat`: continuous batching over a slot KV cache.

- `config.py`: `EngineConfig` (slots, context length, step token budget, prefill chunk, CUDA graphs, LoRA bank).
- `scheduler.py`: decides each step's sequences and token counts (no tensors).
- `runner.py`: runs the step as one forward pass over transformers' modules (torch SDPA attention).
- `kv_cache.py`, `lora.py`, `cuda_graphs.py`: the slot KV cache, the multi-LoRA bank, decode graphs.
- `grammar.py`: llguidance matchers and the token mask of constrained requests.
- `core.py`: `Engine`, the worker thread and the public methods (see its docstring).
"""

from lmsmith.serve.engine.config import EngineConfig
from lmsmith.serve.engine.core import Engine, resolve_device
from lmsmith.serve.engine.lora import LoraInfo
from lmsmith.serve.engine.request import (
    Chunk,
    Completion,
    DeadlineExceeded,
    EngineError,
    Overloaded,
    UnknownAdapterError,
)
from lmsmith.serve.sampling import SamplingParams

__all__ = [
    "Chunk",
    "Completion",
    "DeadlineExceeded",
    "Engine",
    "EngineConfig",
    "EngineError",
    "Overloaded",
    "LoraInfo",
    "SamplingParams",
    "UnknownAdapterError",
    "resolve_device",
]
