"""Engine sizing: how many sequences hold KV slots, how long they may grow, how many tokens one step runs.

Plain dataclass (no torch import) so the API layer can build one from its own settings.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_SLOTS_CPU = 16
DEFAULT_SLOTS_CUDA = 256
# (step token budget, prompt piece) per device: a GPU step is cheap per token, a CPU step is not.
DEFAULT_STEP_TOKENS = {"cpu": (512, 256), "cuda": (4096, 2048)}


@dataclass(frozen=True)
class EngineConfig:
    """Capacity and execution settings of the continuous-batching engine.

    Each field left as None gets a device-dependent default in `resolve`.
    """

    # Sequences that hold a KV slot at once; more requests wait. The KV cache is preallocated for all
    # of them, so memory is slots x max_model_len x layers x 2 x kv_heads x head_dim x dtype size.
    max_slots: int | None = None
    # Longest prompt + answer; None: the model's max_position_embeddings, capped at 2048.
    max_model_len: int | None = None
    # Tokens one forward pass may carry (decodes count 1 each; prompt pieces fill the rest);
    # None: 512 on CPU, 4096 on CUDA.
    max_step_tokens: int | None = None
    # Largest piece of one prompt per step, so a long prompt cannot stall running decodes for long;
    # None: 256 on CPU, 2048 on CUDA.
    prefill_chunk: int | None = None
    # On CUDA, replay decode steps from CUDA graphs captured per (batch bucket, key-length bucket).
    cuda_graphs: bool = True
    # Run decode steps in the graphs' fixed shapes (padded batch, bucketed key length) even without
    # capturing; None: exactly when CUDA graphs are in use. Tests set it on CPU to check that path.
    bucketed_decode: bool | None = None
    # Key lengths are rounded up to a multiple of this for the decode graphs.
    graph_key_len_step: int = 256
    # On CPU, keep a oneDNN-blocked copy of every projection for multi-row steps (about 1.4x faster
    # decode; costs the projections' size again in memory). None: on for CPU when the copy fits in half
    # of the memory available at load.
    packed_weights: bool | None = None
    # LoRA adapters loaded at once, and the largest rank accepted (the adapter bank is preallocated).
    max_loras: int = 8
    max_lora_rank: int = 64
    # A request still waiting for a KV slot after this many seconds is dropped (503, Retry-After);
    # None: it waits for as long as it takes.
    max_queue_wait_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_slots is not None and self.max_slots < 1:
            raise ValueError("max_slots must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1")
        if self.max_step_tokens is not None and self.max_step_tokens < 1:
            raise ValueError("max_step_tokens must be at least 1")
        if self.max_slots is not None and self.max_step_tokens is not None and self.max_step_tokens < self.max_slots:
            raise ValueError("max_step_tokens must be at least max_slots, so every running sequence can decode each step")
        if self.graph_key_len_step < 1 or self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError("graph_key_len_step, max_loras and max_lora_rank must be positive")

    def resolve(self, device_type: str, max_position_embeddings: int | None) -> "ResolvedEngineConfig":
        slots = self.max_slots or (DEFAULT_SLOTS_CUDA if device_type == "cuda" else DEFAULT_SLOTS_CPU)
        limit = max_position_embeddings or DEFAULT_MAX_MODEL_LEN
        model_len = min(self.max_model_len or min(limit, DEFAULT_MAX_MODEL_LEN), limit)
        step_tokens, piece = DEFAULT_STEP_TOKENS.get(device_type, DEFAULT_STEP_TOKENS["cpu"])
        graphs = self.cuda_graphs and device_type == "cuda"
        bucketed = graphs if self.bucketed_decode is None else self.bucketed_decode
        return ResolvedEngineConfig(
            max_slots=slots,
            max_model_len=model_len,
            max_step_tokens=max(self.max_step_tokens or step_tokens, slots),
            prefill_chunk=self.prefill_chunk or piece,
            cuda_graphs=graphs,
            bucketed_decode=bucketed,
            graph_key_len_step=self.graph_key_len_step,
            packed_weights=self.packed_weights,
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
            max_queue_wait_s=self.max_queue_wait_s,
        )


@dataclass(frozen=True)
class ResolvedEngineConfig:
    """`EngineConfig` with every default filled in for one device and model."""

    max_slots: int
    max_model_len: int
    max_step_tokens: int
    prefill_chunk: int
    cuda_graphs: bool
    bucketed_decode: bool
    graph_key_len_step: int
    packed_weights: bool | None  # None: decided from the memory available when the runner loads
    max_loras: int
    max_lora_rank: int
    max_queue_wait_s: float | None = None
