"""The OpenAI wire format: request schemas (pydantic) and response bodies for chat completions, text
completions, embeddings and models.

Only what the server can honour is declared. Every other field of OpenAI's request schemas is refused
with a 400 naming it (`NOT_HONOURED`: penalties other than 0, logit_bias, audio, ...), never
accepted and ignored; chat's `response_format`, `tools` and `tool_choice` are enforced by a grammar
(`structured.py`); `user` is kept for the audit log. Every string is checked for lone surrogates and
every number and list is bounded, so no input reaches the engine in a form that would fail there. Two
vLLM extensions (`top_k`, `repetition_penalty`) and lmsmith's `long_doc` ride in the request body as
extra fields. Logprob bodies are built in `logprobs.py`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmsmith.serve.config import ADAPTER_NAME, LongDocSettings
from lmsmith.serve.engine import Completion
from lmsmith.serve.sampling import MAX_TOP_LOGPROBS, SamplingParams

if TYPE_CHECKING:
    from lmsmith.serve.structured import OutputPlan

MAX_STOP_STRINGS = 4
MAX_CHOICES = 16  # n: answers per prompt
MAX_PROMPTS = 256  # prompts in one /v1/completions batch
MAX_MESSAGES = 1024
MAX_TEXT_CHARS = 1_000_000  # one message or prompt; the body-size limit bounds the whole request first
MAX_PROMPT_TOKENS = 1_000_000
UINT64_MAX = 2**64 - 1
# OpenAI request fields this server does not honour: refused by name (a 400), never silently ignored.
# A field holding its "off" value (null, false, 0, an empty list) is accepted, as it asks for nothing.
CHAT_STRUCTURE_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")
MAX_TOOLS = 128
MAX_SCHEMA_DEPTH = 32
NOT_HONOURED = {
    "tools": "tools (function calling) is served on /v1/chat/completions only",
    "tool_choice": "tool_choice is served on /v1/chat/completions only",
    "parallel_tool_calls": "parallel_tool_calls is served on /v1/chat/completions only",
    "functions": "functions (the deprecated form of tools) is not supported; send tools",
    "function_call": "function_call (the deprecated form of tool_choice) is not supported; send tool_choice",
    "response_format": "response_format (JSON mode, JSON schema) is served on /v1/chat/completions only",
    "frequency_penalty": "frequency_penalty is not supported; repetition_penalty is",
    "presence_penalty": "presence_penalty is not supported; repetition_penalty is",
    "logit_bias": "logit_bias is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning_effort is not supported",
    "web_search_options": "web search is not supported",
    "service_tier": "service tiers are not supported",
    "metadata": "metadata (stored completions) is not supported",
    "store": "store (stored completions) is not supported",
}


def _off(value: Any) -> bool:
    return value is None or value is False or value == 0 or value == [] or value == {} or value == "none" \
        or value == ["text"]


def check_text(value: Any, where: str = "") -> None:
    """Refuse lone surrogates anywhere in a JSON value (they cannot be encoded, so they would fail in
    the tokenizer), naming where."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where or 'body'}: contains a lone surrogate (not valid Unicode text)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, where)
            check_text(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_text(item, f"{where}[{index}]")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(item) for item in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(item) for item in value), default=0)
    return 0


def _bounded_schema(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and _depth(value) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"a schema nests at most {MAX_SCHEMA_DEPTH} levels")
    return value


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str = Field(max_length=MAX_TEXT_CHARS, description="A JSON object, as a string.")

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except ValueError:
            raise ValueError("arguments must be a JSON object (as a string)") from None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be a JSON object (as a string)")
        return value


class AssistantToolCall(BaseModel):
    """A call the assistant made in an earlier turn, sent back with the conversation."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = Field(None)
    tool_calls: Optional[list[AssistantToolCall]] = Field(None, max_length=MAX_TOOLS)
    tool_call_id: Optional[str] = Field(None, min_length=1, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _honoured_fields(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for field in ("function_call", "name", "refusal", "audio"):
                if not _off(value.get(field)):
                    raise ValueError(f"{field}: message {field} is not supported by this server")
            value = {key: item for key, item in value.items() if key not in ("function_call", "name", "refusal",
                                                                             "audio")}
        return value

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message holds tool calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("tool_call_id: a tool message names the call it answers")
        if self.role != "tool" and self.tool_call_id is not None:
            raise ValueError("tool_call_id: only a tool message answers a call")
        if self.role == "tool" and self.content is None:
            raise ValueError("content: a tool message holds the tool's result")
        return self

    @field_validator("content")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        text = value if isinstance(value, str) else "".join(part.text for part in value or [])
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"a message holds at most {MAX_TEXT_CHARS:,} characters")
        return value

    def as_template_message(self) -> dict[str, Any]:
        # Chat templates know "system"; OpenAI's newer "developer" role means the same thing.
        role = "system" if self.role == "developer" else self.role
        content = "".join(part.text for part in self.content) if isinstance(self.content, list) else self.content
        message: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls:
            # Templates render the arguments as JSON themselves (`tojson`), so they get the object.
            message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": json.loads(call.function.arguments)}}
                for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


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

    model: str = Field(max_length=256)
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_PROMPT_TOKENS)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1, le=1_000_000, description="vLLM's extension; -1 or 0: off.")
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10, description="vLLM's extension; 1: off.")
    seed: Optional[int] = Field(None, ge=0, le=UINT64_MAX - MAX_CHOICES, description="A uint64.")
    user: Optional[str] = Field(None, max_length=256, description="The end user's id, kept in the audit log.")
    stop: Union[str, list[str], None] = None
    n: Optional[int] = Field(None, ge=1, le=MAX_CHOICES, description="Answers per prompt.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    long_doc: Union[bool, LongDocRequest, None] = None
    timeout: Optional[float] = Field(
        None, gt=0, le=86_400, description="lmsmith's extension: seconds after which the server drops the request "
        "(504) if its answer is not complete, freeing its place; the OpenAI SDK's own `timeout` is client-side.")

    honoured: ClassVar[tuple[str, ...]] = ()  # fields of NOT_HONOURED that this endpoint does serve

    @model_validator(mode="before")
    @classmethod
    def _honoured_and_valid_text(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for field, reason in NOT_HONOURED.items():
                if field in value and field not in cls.honoured and not _off(value[field]):
                    raise ValueError(f"{field}: {reason}")
            check_text(value)
        return value

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: Union[str, list[str], None]) -> Union[str, list[str], None]:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed")
        if any(len(stop) > 1000 for stop in ([value] if isinstance(value, str) else value or [])):
            raise ValueError("a stop sequence holds at most 1,000 characters")
        return value

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """(logprobs, prompt_logprobs) for the engine: top counts for generated and for prompt tokens."""
        return None, None

    def sampling_params(self, default_max_tokens: int, choice: int = 0) -> SamplingParams:
        """The engine's settings for answer number `choice` (a seeded request's answers differ by seed + choice)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        requested = self.requested_max_tokens()
        logprobs, prompt_logprobs = self.logprob_counts()
        fields: dict[str, Any] = {
            "max_tokens": default_max_tokens if requested is None else requested,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "seed": None if self.seed is None else self.seed + choice,
            "stop": tuple(stop for stop in stops if stop),
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
            "timeout_s": self.timeout,
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


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=FUNCTION_NAME)
    description: Optional[str] = Field(None, max_length=MAX_TEXT_CHARS)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: Optional[bool] = Field(None, description="Always enforced: the answer follows the schema either way.")

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _bounded_schema(value)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema: give it exactly when type is json_schema")
        return self

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type}
        if self.json_schema is not None:
            body["json_schema"] = {"name": self.json_schema.name, "schema": self.json_schema.schema_}
        return body


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=FUNCTION_NAME)
    description: Optional[str] = Field(None, max_length=MAX_TEXT_CHARS)
    parameters: Optional[dict[str, Any]] = Field(None, description="A JSON schema of the arguments object.")
    strict: Optional[bool] = Field(None, description="Always enforced: the arguments follow the schema either way.")

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        return _bounded_schema(value)


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition

    def as_dict(self) -> dict[str, Any]:
        """The tool as the chat template and the grammar read it (unset fields left out)."""
        return {"type": "function", "function": self.function.model_dump(exclude_none=True, exclude={"strict"})}


class ToolChoiceFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: ToolChoiceFunction


class ChatCompletionRequest(GenerationFields):
    honoured: ClassVar[tuple[str, ...]] = CHAT_STRUCTURE_FIELDS

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_PROMPT_TOKENS)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = Field(None, max_length=MAX_TOOLS)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: set logprobs to true to receive top_logprobs")
        return self

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None

    def template_messages(self) -> list[dict[str, Any]]:
        return [message.as_template_message() for message in self.messages]

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [tool.as_dict() for tool in self.tools] if self.tools else None

    def output_plan(self) -> "OutputPlan":
        """The grammar the answer must follow and whether it may hold tool calls (StructureError: a 400)."""
        from lmsmith.serve.structured import plan_output

        tool_choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice
        return plan_output(self.response_format.as_dict() if self.response_format else None, self.template_tools(),
                           tool_choice, self.parallel_tool_calls)


Prompt = Union[str, list[int]]


class CompletionRequest(GenerationFields):
    """`/v1/completions`: prompts continued as they are (no chat template).

    A prompt is text or token ids; `prompt` may be one or a batch (choices are numbered prompt by prompt,
    n per prompt). `echo` puts the prompt in front of the answer, with its tokens' logprobs when
    `logprobs` asks (the first token has none); `max_tokens: 0` with echo only scores the prompt.
    """

    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(None, ge=0, le=MAX_PROMPT_TOKENS)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: Optional[int] = Field(None, ge=1, le=MAX_CHOICES)
    suffix: Optional[str] = Field(None, max_length=MAX_TEXT_CHARS)

    @field_validator("prompt")
    @classmethod
    def _prompts_not_empty(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("give at least one prompt")
            if len(value) > MAX_PROMPTS and not isinstance(value[0], int):
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
            if any(isinstance(item, list) and not item for item in value):
                raise ValueError("a token-id prompt must not be empty")
            if any(isinstance(item, int) and item < 0 for item in value) or any(
                    isinstance(item, list) and min(item) < 0 for item in value):
                raise ValueError("token ids must be >= 0")
            if any(isinstance(item, int) and item > 2**31 for item in value) or any(
                    isinstance(item, list) and max(item) > 2**31 for item in value):
                raise ValueError("token ids must fit the vocabulary (< 2^31)")
            if isinstance(value[0], int) and len(value) > MAX_PROMPT_TOKENS:
                raise ValueError(f"a token-id prompt holds at most {MAX_PROMPT_TOKENS:,} tokens")
        if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
            raise ValueError(f"a prompt holds at most {MAX_TEXT_CHARS:,} characters")
        return value

    @model_validator(mode="after")
    def _honoured(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 generates nothing; it is only useful with echo: true")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of: ranking several samples server-side is not supported; use n")
        if self.suffix:
            raise ValueError("suffix: insertion (text after the completion) is not supported")
        if self.stream and self.echo and self.max_tokens == 0:
            raise ValueError("stream: an echo-only request (max_tokens 0) has nothing to stream")
        return self

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return self.logprobs, self.logprobs if self.echo else None

    def prompts(self) -> list[Prompt]:
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if value and isinstance(value[0], int):
            return [list(value)]  # type: ignore[arg-type]
        return list(value)  # type: ignore[arg-type]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=256)
    input: Union[str, list[str]] = Field(max_length=MAX_TEXT_CHARS)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1, le=65536)
    user: Optional[str] = Field(None, max_length=256, description="The end user's id, kept in the audit log.")

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, value: Any) -> Any:
        check_text(value)
        return value

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        if isinstance(value, list) and not value:
            raise ValueError("input must not be empty")
        if isinstance(value, list) and len(value) > 2048:
            raise ValueError("at most 2,048 inputs per request")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class RagSearchRequest(BaseModel):
    """`POST /v1/rag/search`: the chunks a knowledge-base model name would ground an answer in."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=256, description="A knowledge-base model name (`lmsmith serve --kb NAME=KB`).")
    query: str = Field(min_length=1, max_length=20_000)
    k: int = Field(5, ge=1, le=100)
    mode: Literal["hybrid", "dense", "sparse"] = "hybrid"
    filter: list[str] = Field(default_factory=list, max_length=32, description="KEY=VALUE metadata filters.")

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, value: Any) -> Any:
        check_text(value)
        return value

    def search_config(self) -> Any:
        from lmsmith.rag.config import SearchConfig

        return SearchConfig(k=self.k, mode=self.mode, filter=self.filter)


class KeyCreate(BaseModel):
    """`POST /admin/keys` (the fields of `lmsmith keys create`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    role: str = Field("user", pattern="^(admin|operator|user|viewer)$")
    models: list[str] = Field(default_factory=list, description="Models the key may use; empty: all.")
    rpm: Optional[int] = Field(None, ge=1, le=2**31 - 1)
    tpm: Optional[int] = Field(None, ge=1, le=2**31 - 1)
    concurrency: Optional[int] = Field(None, ge=1, le=2**31 - 1)
    quota_tokens: Optional[int] = Field(None, ge=1, le=2**62)
    expires: Optional[str] = Field(None, pattern=r"^\d{1,6}[dhms]$", description="e.g. 30d, 12h")


class FeedbackBody(BaseModel):
    """`POST /v1/feedback`: a rating of an earlier answer, by its request id (the X-Request-Id header)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=64)
    rating: int = Field(ge=1, le=5, description="1-2: wrong or unhelpful; 4-5: right.")
    correction: Optional[str] = Field(None, max_length=20000, description="The answer it should have given.")
    comment: Optional[str] = Field(None, max_length=20000)


class Promote(BaseModel):
    """`POST /admin/registry/{name}/promote`."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=2**31 - 1)


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


def completion_body(completion_id: str, model: str, choices: list[dict[str, Any]],
                    usage: dict[str, int]) -> dict[str, Any]:
    """A `chat.completion`; each choice is `chat_choice(...)`."""
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage}


def chat_choice(index: int, completion: Completion, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": completion.text}, "logprobs": logprobs,
            "finish_reason": completion.finish_reason}


def _stream_event(
    object_: str, completion_id: str, created: int, model: str, choice: dict[str, Any] | None,
    usage: dict[str, int] | None, with_usage_field: bool,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": completion_id,
        "object": object_,
        "created": created,
        "model": model,
        "choices": [] if choice is None else [choice],
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
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` makes the usage-only chunk (no choices)."""
    choice = None if delta is None else {"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}
    return _stream_event("chat.completion.chunk", completion_id, created, model, choice, usage, with_usage_field)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def text_completion_body(completion_id: str, model: str, choices: list[dict[str, Any]],
                         usage: dict[str, int]) -> dict[str, Any]:
    """A `text_completion`; each choice is `text_choice(...)`."""
    return {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage}


def text_choice(index: int, text: str, finish_reason: str | None,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def text_chunk_body(
    completion_id: str,
    created: int,
    model: str,
    text: str | None,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
    with_usage_field: bool = False,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed `text_completion` event; `text=None` makes the usage-only event (no choices)."""
    choice = None if text is None else text_choice(index, text, finish_reason, logprobs)
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
