"""The OpenAI wire format: request schemas (pydantic) and response bodies for chat completions, text
completions, embeddings and models.

Only what the server can honour is declared; other OpenAI fields a client may send (`user`, `metadata`,
...) are ignored, as an OpenAI-compatible server is expected to do. Two vLLM extensions (`top_k`,
`repetition_penalty`) and lmsmith's `long_doc` ride in the request body as extra fields.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmsmith.serve.config import ADAPTER_NAME, LongDocSettings
from lmsmith.serve.engine import Completion
from lmsmith.serve.sampling import SamplingParams

MAX_STOP_STRINGS = 4


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def as_template_message(self) -> dict[str, str]:
        # Chat templates know "system"; OpenAI's newer "developer" role means the same thing.
        role = "system" if self.role == "developer" else self.role
        if isinstance(self.content, list):
            return {"role": role, "content": "".join(part.text for part in self.content)}
        return {"role": role, "content": self.content or ""}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class LongDocRequest(BaseModel):
    """The `long_doc` extra body field: each setting left out takes the server's default."""

    model_config = ConfigDict(extra="forbid")

    chunk_tokens: Optional[int] = Field(None, ge=16)
    overlap: Optional[int] = Field(None, ge=0)
    map_prompt: Optional[str] = None
    reduce_prompt: Optional[str] = None
    map_max_tokens: Optional[int] = Field(None, ge=1)

    def over(self, defaults: LongDocSettings) -> LongDocSettings:
        """These settings on top of the server's (validated together, so overlap < chunk_tokens holds)."""
        return LongDocSettings.model_validate(
            defaults.model_dump(include=set(LongDocSettings.model_fields)) | self.model_dump(exclude_none=True)
        )


class GenerationFields(BaseModel):
    """The sampling fields chat and text completions share, and lmsmith's extra `long_doc`."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1, description="vLLM's extension; -1 or 0: off.")
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10, description="vLLM's extension; 1: off.")
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: Optional[int] = Field(None, ge=1, le=1, description="Only one choice per request is supported.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    long_doc: Union[bool, LongDocRequest, None] = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: Union[str, list[str], None]) -> Union[str, list[str], None]:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed")
        return value

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        fields: dict[str, Any] = {
            "max_tokens": self.requested_max_tokens() or default_max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "seed": self.seed,
            "stop": tuple(stop for stop in stops if stop),
        }
        # The engine's own defaults stand for the extensions a request leaves out.
        if self.top_k is not None:
            fields["top_k"] = max(self.top_k, 0)
        if self.repetition_penalty is not None:
            fields["repetition_penalty"] = self.repetition_penalty
        return SamplingParams(**fields)

    def long_doc_settings(self, defaults: LongDocSettings) -> LongDocSettings | None:
        """The long_doc settings this request asks for; None when it does not ask."""
        if self.long_doc is None or self.long_doc is False:
            return None
        if self.long_doc is True:
            return LongDocSettings.model_validate(defaults.model_dump(include=set(LongDocSettings.model_fields)))
        return self.long_doc.over(defaults)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        return [message.as_template_message() for message in self.messages]


class CompletionRequest(GenerationFields):
    """`/v1/completions`: one text prompt, continued as it is (no chat template)."""

    prompt: Union[str, list[str]]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_text_prompt(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        if isinstance(value, list) and not value:
            raise ValueError("input must not be empty")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class AdapterLoad(BaseModel):
    """`POST /admin/loras`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ADAPTER_NAME.pattern)
    path: str = Field(min_length=1)


def new_completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(completion_id: str, model: str, completion: Completion) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": completion.text},
            "logprobs": None,
            "finish_reason": completion.finish_reason,
        }],
        "usage": usage_body(completion.prompt_tokens, completion.completion_tokens),
    }


def _stream_event(
    object_: str, completion_id: str, created: int, model: str, choice: dict[str, Any] | None,
    usage: dict[str, int] | None, with_usage_field: bool,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": completion_id,
        "object": object_,
        "created": created,
        "model": model,
        "choices": [] if choice is None else [{"index": 0, **choice}],
    }
    if with_usage_field:
        body["usage"] = usage
    return body


def chunk_body(
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, str] | None,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
    with_usage_field: bool = False,
) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` makes the usage-only chunk (no choices)."""
    choice = None if delta is None else {"delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return _stream_event("chat.completion.chunk", completion_id, created, model, choice, usage, with_usage_field)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def text_completion_body(completion_id: str, model: str, completion: Completion) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": completion.text, "logprobs": None, "finish_reason": completion.finish_reason}],
        "usage": usage_body(completion.prompt_tokens, completion.completion_tokens),
    }


def text_chunk_body(
    completion_id: str,
    created: int,
    model: str,
    text: str | None,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
    with_usage_field: bool = False,
) -> dict[str, Any]:
    """One streamed `text_completion` event; `text=None` makes the usage-only event (no choices)."""
    choice = None if text is None else {"text": text, "logprobs": None, "finish_reason": finish_reason}
    return _stream_event("text_completion", completion_id, created, model, choice, usage, with_usage_field)


def model_card(model_id: str, created: int, owned_by: str = "lmsmith", parent: str | None = None) -> dict[str, Any]:
    card: dict[str, Any] = {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}
    if parent is not None:
        card["parent"] = parent
    return card


def embeddings_body(model: str, vectors: list[Any], prompt_tokens: int) -> dict[str, Any]:
    return {
        "object": "list",
        "model": model,
        "data": [{"object": "embedding", "index": index, "embedding": vector} for index, vector in enumerate(vectors)],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
