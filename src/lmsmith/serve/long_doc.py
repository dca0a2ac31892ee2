"""Long documents: cut into overlapping token windows, map each window, reduce the answers into one.

The tokenizer (HF `tokenizers`, through its offsets) decides the windows: a chunk is the text between
the first and last character of `chunk_tokens` consecutive tokens, so a chunk never ends inside a
character. Each window starts `chunk_tokens - overlap` tokens after the one before (a sliding window),
so a sentence cut at one boundary is whole in the next chunk. The map calls run concurrently through the
same client as any request, so the engine batches them. Their answers are reduced with the reduce prompt;
when they are too long to reduce at once, they are reduced in groups first (a tree), each group fitting
the chunk budget. The final reduce streams like any answer.

The document is the last user message (chat) or the prompt (text completion); earlier messages, such as
the system prompt, go with every call.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from lmsmith.serve.client import ClientError, GenerateRequest, ModelClient, Prepared
from lmsmith.serve.config import LongDocSettings
from lmsmith.serve.engine import Chunk

PARTIAL_SEPARATOR = "\n\n"
MIN_REDUCE_BUDGET = 16


@dataclass(frozen=True)
class Window:
    """Tokens [start, end) of the document, and the characters [char_start, char_end) they cover."""

    start: int
    end: int
    char_start: int
    char_end: int
    text: str


def token_windows(total: int, chunk_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) token ranges covering `total` tokens, each `chunk_tokens` long (the last may be shorter)."""
    if total <= 0:
        return []
    stride = chunk_tokens - overlap
    windows = []
    start = 0
    while True:
        end = min(start + chunk_tokens, total)
        windows.append((start, end))
        if end == total:
            return windows
        start += stride


def split_document(text: str, tokenizer: Any, chunk_tokens: int, overlap: int) -> list[Window]:
    """The document's windows, as text cut at character offsets of the token boundaries."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    windows = []
    for start, end in token_windows(len(offsets), chunk_tokens, overlap):
        first_char, last_char = offsets[start][0], offsets[end - 1][1]
        windows.append(Window(start, end, first_char, last_char, text[first_char:last_char]))
    return windows


def document_of(request: GenerateRequest) -> str:
    if request.messages is None:
        return request.prompt or ""
    for message in reversed(request.messages):
        if message["role"] == "user":
            return message["content"]
    raise ClientError("long_doc needs a user message holding the document", "messages")


def with_document(request: GenerateRequest, text: str, max_tokens: int) -> GenerateRequest:
    """`request` with its document replaced by `text` (a map or reduce prompt) and its own max_tokens."""
    params = dataclasses.replace(request.params, max_tokens=max_tokens)
    if request.messages is None:
        return dataclasses.replace(request, prompt=text, params=params)
    last_user = max(index for index, message in enumerate(request.messages) if message["role"] == "user")
    # Messages after the document (a trailing assistant prefix) would not make sense for a chunk.
    messages = [*request.messages[:last_user], {"role": "user", "content": text}]
    return dataclasses.replace(request, messages=messages, params=params)


@dataclass
class LongDocRun:
    """One map-reduce over a document; counts its calls and tokens for usage and for tests."""

    client: ModelClient
    settings: LongDocSettings
    tokenizer: Any
    check_fits: Callable[[Prepared], None]
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    windows: list[Window] = dataclasses.field(default_factory=list)

    async def open(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Map every window, reduce down to one prompt, and return the final reduce's stream."""
        self.windows = split_document(document_of(request), self.tokenizer, self.settings.chunk_tokens,
                                      self.settings.overlap)
        if not self.windows:
            raise ClientError("long_doc: the document is empty", "messages" if request.messages else "prompt")
        total = len(self.windows)
        map_prompts = [
            self.settings.map_prompt.format(chunk=window.text, index=number, total=total)
            for number, window in enumerate(self.windows, start=1)
        ]
        partials = await self._all(request, map_prompts)
        budget = await self._reduce_budget(request)
        while True:
            groups = self._group(partials, budget)
            if len(groups) == 1:
                break
            partials = await self._all(request, [self._reduce_prompt(group) for group in groups])
        final = with_document(request, self._reduce_prompt(groups[0]), request.params.max_tokens)
        prepared = await self._prepare(final)
        return self._final_stream(await self.client.open(prepared))

    def _reduce_prompt(self, partials: list[str]) -> str:
        return self.settings.reduce_prompt.format(partials=PARTIAL_SEPARATOR.join(partials))

    async def _reduce_budget(self, request: GenerateRequest) -> int:
        """Tokens of partials one reduce prompt may hold: what the context leaves beside the template and
        the answer; the chunk size when the window is unknown (upstream mode)."""
        window = self.client.context_window
        if window is None:
            return self.settings.chunk_tokens
        empty = await self.client.prepare(with_document(request, self._reduce_prompt([]), request.params.max_tokens))
        room = window - (empty.prompt_tokens or 0) - max(request.params.max_tokens, self.settings.map_max_tokens)
        return max(room, MIN_REDUCE_BUDGET)

    def _group(self, partials: list[str], budget: int) -> list[list[str]]:
        """Consecutive partials whose joined length fits `budget` tokens (a group holds at least one)."""
        groups: list[list[str]] = [[]]
        used = 0
        for partial in partials:
            size = len(self.tokenizer(partial + PARTIAL_SEPARATOR, add_special_tokens=False)["input_ids"])
            if groups[-1] and used + size > budget:
                groups.append([])
                used = 0
            groups[-1].append(partial)
            used += size
        if len(partials) > 1 and len(groups) == len(partials):
            # Every partial alone fills a group: reducing would not shrink the list; reduce in pairs.
            groups = [partials[i:i + 2] for i in range(0, len(partials), 2)]
        return groups

    async def _all(self, request: GenerateRequest, prompts: list[str]) -> list[str]:
        calls = [self._answer(with_document(request, prompt, self.settings.map_max_tokens)) for prompt in prompts]
        return list(await _gather_cancelling(calls))

    async def _prepare(self, request: GenerateRequest) -> Prepared:
        prepared = await self.client.prepare(request)
        self.check_fits(prepared)
        return prepared

    async def _answer(self, request: GenerateRequest) -> str:
        stream = await self.client.open(await self._prepare(request))
        parts: list[str] = []
        last: Chunk | None = None
        try:
            async for chunk in stream:
                parts.append(chunk.text)
                last = chunk
        finally:
            await stream.aclose()
        self.calls += 1
        if last is not None:
            self.prompt_tokens += last.prompt_tokens
            self.completion_tokens += last.completion_tokens
        return "".join(parts).strip()

    async def _final_stream(self, stream: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        """The final reduce's chunks; the last one reports the usage of every call in the run."""
        try:
            async for chunk in stream:
                if chunk.finish_reason is None:
                    yield chunk
                    continue
                self.calls += 1
                yield Chunk(chunk.text, self.prompt_tokens + chunk.prompt_tokens,
                            self.completion_tokens + chunk.completion_tokens, chunk.finish_reason)
        finally:
            await stream.aclose()


async def _gather_cancelling(calls: list[Awaitable[str]]) -> list[str]:
    """Run all calls; if one fails, cancel the others (their engine requests are dropped) and re-raise."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
