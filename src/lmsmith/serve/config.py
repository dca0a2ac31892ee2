"""Settings of `lmsmith serve` and of the serve stage (light: no torch import)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field, field_validator, model_validator

from lmsmith.rag.grounding import RagSettings
from lmsmith.schema import StrictModel

if TYPE_CHECKING:
    from lmsmith.serve.engine.config import EngineConfig

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

DEFAULT_MAP_PROMPT = (
    "Part {index} of {total} of a long document follows. Summarize it, keeping every name, figure and date.\n\n"
    "{chunk}"
)
DEFAULT_REDUCE_PROMPT = (
    "Below are summaries of consecutive parts of one document. Combine them into a single report.\n\n"
    "{partials}"
)


class CacheConfig(StrictModel):
    """The response cache: exact-match answers for deterministic requests (temperature 0 or a seed)."""

    backend: Literal["none", "memory", "redis"] = Field(
        "none", description="memory: an in-process LRU; redis: shared by every server that points at it."
    )
    max_entries: int = Field(4096, ge=1, description="LRU size (memory backend).")
    ttl_s: float = Field(3600.0, gt=0, description="Seconds an answer stays valid.")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="redis backend: where the server is.")
    key_prefix: str = Field("lmsmith:cache:", description="redis backend: namespace for the keys.")


class LongDocSettings(StrictModel):
    """How a long input is cut, mapped chunk by chunk, then reduced; a request may override each field."""

    chunk_tokens: int = Field(512, ge=16, description="Tokens per chunk of the document.")
    overlap: int = Field(64, ge=0, description="Tokens a chunk shares with the one before (sliding window).")
    map_prompt: str = Field(DEFAULT_MAP_PROMPT, description="Asked of each chunk; {chunk}, {index}, {total}.")
    reduce_prompt: str = Field(DEFAULT_REDUCE_PROMPT, description="Combines the chunk answers; {partials}.")
    map_max_tokens: int = Field(128, ge=1, description="max_tokens of each map (and intermediate reduce) call.")

    @field_validator("map_prompt")
    @classmethod
    def _map_prompt_places_the_chunk(cls, value: str) -> str:
        return _check_template(value, "{chunk}", ("chunk", "index", "total"))

    @field_validator("reduce_prompt")
    @classmethod
    def _reduce_prompt_places_the_partials(cls, value: str) -> str:
        return _check_template(value, "{partials}", ("partials",))

    @model_validator(mode="after")
    def _overlap_leaves_progress(self) -> "LongDocSettings":
        if self.overlap >= self.chunk_tokens:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than chunk_tokens ({self.chunk_tokens})")
        return self


def _check_template(value: str, required: str, allowed: tuple[str, ...]) -> str:
    if required not in value:
        raise ValueError(f"the template must contain {required}")
    for name in re.findall(r"{([^{}]*)}", value):
        if name not in allowed:
            raise ValueError(f"unknown placeholder {{{name}}}; allowed: {', '.join('{' + a + '}' for a in allowed)}")
    return value


class LongDocConfig(LongDocSettings):
    """Server-wide long-document defaults, plus when the mode starts without being asked for."""

    auto: bool = Field(False, description="Map-reduce inputs that do not fit the context instead of refusing them.")
    max_input_tokens: Optional[int] = Field(
        None, ge=1, description="With auto: also map-reduce inputs longer than this many tokens."
    )


class PushBack(StrictModel):
    """How the server turns work away rather than drown in it: each limit answers at once with a clear
    status (docs/serving.md, "push-back"). The `lmsmith serve` flags are generated from these fields."""

    max_body_mb: float = Field(8.0, gt=0, description="Largest request body; larger ones get 413 before they are read.")
    body_timeout_s: float = Field(30.0, gt=0, description="A request body that stalls this long between pieces gets 408.")
    header_timeout_s: float = Field(
        10.0, gt=0, description="A connection whose request line and headers take longer than this is closed.")
    max_waiting: Optional[int] = Field(
        256, ge=1, description="Requests waiting for a KV slot beyond which new ones get 503 with Retry-After "
        "(none: unbounded).")
    max_waiting_tokens: Optional[int] = Field(
        262_144, ge=1, description="Prompt tokens waiting for a KV slot beyond which new requests get 503 with "
        "Retry-After; a request is always let into an empty queue (none: unbounded).")
    max_queue_wait_s: Optional[float] = Field(
        120.0, gt=0, description="A request still waiting for a slot after this long is dropped with 503 "
        "(none: it waits).")


class ServeConfig(StrictModel):
    """Serving settings; in a recipe, the serve stage starts the server and asks it held-out questions."""

    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port (pipeline smoke check).")
    smoke_questions: int = Field(3, ge=0, description="Held-out questions asked through the API.")
    max_new_tokens: int = Field(96, ge=1, description="max_tokens of a request that gives none.")
    device: str = Field("auto", description="torch device for the model; auto: cuda when present, else cpu.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; auto keeps the dtype the model was saved in."
    )
    max_slots: Optional[int] = Field(
        None, ge=1, description="Requests decoding at once (KV slots); default: 16 on CPU, 256 on CUDA."
    )
    max_model_len: Optional[int] = Field(None, ge=2, description="Longest prompt + answer; default: the model's.")
    prefill_chunk: int = Field(256, ge=1, description="Largest piece of one prompt per engine step.")
    cuda_graphs: bool = Field(True, description="On CUDA, replay decode steps from captured graphs.")
    packed_weights: Optional[bool] = Field(
        None, description="On CPU, keep a row-kernel copy of every projection (faster decode, their memory "
                          "again); None: when it fits in half the free memory.")
    push_back: PushBack = Field(default_factory=PushBack)
    registry: Optional[str] = Field(
        None, description="Serve this registry name's current version (`lmsmith registry`) and follow promotes "
        "and rollbacks without a restart; no model folder is given then.")
    registry_poll_s: float = Field(2.0, gt=0, description="Seconds between checks of the registry's current version.")
    variant: Optional[str] = Field(
        None, description="Serve the run's compressed variant of this name (RUN/compress/<name>, the compress "
        "stage's variants) instead of its tuned model.")
    loras: dict[str, str] = Field(
        default_factory=dict, description="Adapters loaded at start, name -> peft folder; requests pick one by `model`."
    )
    upstreams: list[str] = Field(
        default_factory=list, description="Front these OpenAI-compatible servers instead of loading a model."
    )
    health_check_interval_s: float = Field(5.0, gt=0, description="Upstream mode: seconds between health checks.")
    tokenizer: Optional[str] = Field(
        None, description="Upstream mode: a tokenizer folder, so long_doc can count and cut tokens."
    )
    embedding_model: str = Field(
        "minilm", description="sentence-transformers model for /v1/embeddings: minilm (bundled), a folder, or none."
    )
    kbs: dict[str, str] = Field(
        default_factory=dict, description="Model names answered from a knowledge base with the served model, "
        "name -> KB folder (`lmsmith rag build`).")
    rag: RagSettings = Field(default_factory=RagSettings)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    long_doc: LongDocConfig = Field(default_factory=LongDocConfig)

    def engine_config(self) -> "EngineConfig":
        from lmsmith.serve.engine.config import EngineConfig

        return EngineConfig(max_slots=self.max_slots, max_model_len=self.max_model_len,
                            prefill_chunk=self.prefill_chunk, cuda_graphs=self.cuda_graphs,
                            packed_weights=self.packed_weights, max_queue_wait_s=self.push_back.max_queue_wait_s)

    @field_validator("loras", "kbs")
    @classmethod
    def _adapter_names_are_model_ids(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not ADAPTER_NAME.match(name):
                raise ValueError(f"adapter name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        return value

    @model_validator(mode="after")
    def _variant_is_local(self) -> "ServeConfig":
        if self.variant is not None and self.upstreams:
            raise ValueError("variant: a compressed variant is served locally; it does not apply to upstreams")
        if self.registry is not None and (self.upstreams or self.variant is not None):
            raise ValueError("registry: a registry version is served locally and names its own variant")
        return self

    @field_validator("upstreams")
    @classmethod
    def _upstreams_are_http_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"upstream {url!r} is not an http(s) URL")
        return value
