"""Answers grounded in a knowledge base, for `lmsmith serve --kb NAME=KB`: the model name NAME answers
from the KB's chunks with the server's own model.

For each chat request the last user message is the query; the top chunks go into a system message,
numbered [1], [2], ... within a token budget (the served model's tokenizer counts), and the response
carries them as `citations` (first, when streamed). A question no chunk shares a word with (and, when set,
whose best dense score is under `min_dense_score`) gets the refusal instead of an answer the KB cannot
back.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from pydantic import Field

from lmsmith.rag.config import SearchConfig
from lmsmith.schema import StrictModel

DEFAULT_PROMPT = ("请只根据下面编号的资料回答用户的问题，并在用到资料的句子后标注其编号，例如[1]。"
                  "资料中没有答案时，直接说明资料中没有相关信息。\n\n{context}")
DEFAULT_REFUSAL = "资料库中没有与这个问题相关的内容，无法根据资料回答。"


def source_block(index: int, label: str, text: str) -> str:
    """One numbered source as the model reads it (training data for grounded answers uses the same form)."""
    return f"[{index}] {label}\n{text}"


def with_sources(prompt: str, blocks: list[str]) -> str:
    return prompt.replace("{context}", "\n\n".join(blocks))


class RagSettings(StrictModel):
    """How a KB-backed model name answers (`lmsmith serve --kb NAME=FOLDER`)."""

    top_k: int = Field(4, ge=1, le=50, description="Chunks put in the prompt, at most.")
    context_tokens: int = Field(1536, ge=64, description="Prompt budget for the chunks, in the served model's tokens.")
    require_word_match: bool = Field(
        True, description="Refuse when no chunk shares a word (BM25 over jieba words) with the question.")
    min_dense_score: Optional[float] = Field(
        None, ge=-1, le=1, description="Also refuse when the best chunk's cosine similarity is under this.")
    prompt: str = Field(DEFAULT_PROMPT, description="The system message; {context} becomes the numbered chunks.")
    refusal: str = Field(DEFAULT_REFUSAL, description="The answer to a question the KB cannot back.")


@dataclass
class Grounding:
    messages: list[dict[str, Any]]
    citations: list[dict[str, Any]]
    refusal: str | None = None


class GroundedModel:
    """A KB and the settings it answers with; `ground` runs the search on a worker thread."""

    def __init__(self, name: str, folder: str | Path, settings: RagSettings | None = None):
        from lmsmith.rag.kb import KnowledgeBase

        self.name = name
        self.kb = KnowledgeBase.open(folder)
        self.settings = settings or RagSettings()
        if "{context}" not in self.settings.prompt:
            raise ValueError("rag prompt: it must hold {context}, where the chunks go")

    async def ground(self, messages: list[dict[str, Any]], tokenizer: Any) -> Grounding:
        return await asyncio.to_thread(self.ground_now, messages, tokenizer)

    def ground_now(self, messages: list[dict[str, Any]], tokenizer: Any = None) -> Grounding:
        """`ground` on the calling thread (batch work: evaluation); without a tokenizer the budget counts
        characters."""
        return self.ground_many([messages], tokenizer)[0]

    def ground_many(self, conversations: Sequence[list[dict[str, Any]]], tokenizer: Any = None) -> list[Grounding]:
        """`ground_now` for each conversation, their questions searched as one batch."""
        queries = [_question(messages) for messages in conversations]
        found = self.kb.search_many(queries, SearchConfig(k=self.settings.top_k))
        return [self._grounding(messages, hits, tokenizer) for messages, hits in zip(conversations, found)]

    def _grounding(self, messages: list[dict[str, Any]], hits: list[Any], tokenizer: Any) -> Grounding:
        settings = self.settings
        no_words = settings.require_word_match and not any(hit.sparse for hit in hits)
        best_dense = max((hit.dense for hit in hits if hit.dense is not None), default=None)
        too_far = settings.min_dense_score is not None and (best_dense is None or best_dense < settings.min_dense_score)
        if not hits or no_words or too_far:
            return Grounding(messages, [], settings.refusal)
        blocks, citations, used = [], [], 0
        for hit in hits:
            label = " / ".join([hit.chunk["title"] or hit.chunk["source"], *hit.chunk["title_path"]])
            block = source_block(len(blocks) + 1, label, hit.chunk["text"])
            cost = len(tokenizer(block, add_special_tokens=False)["input_ids"]) if tokenizer is not None else len(block)
            if blocks and used + cost > settings.context_tokens:
                break
            blocks.append(block)
            used += cost
            citations.append({"index": len(blocks), **hit.body()})
        system = with_sources(settings.prompt, blocks)
        if messages and messages[0]["role"] == "system":  # the caller's instructions stay, after the sources
            grounded = [{**messages[0], "content": system + "\n\n" + messages[0]["content"]}, *messages[1:]]
        else:
            grounded = [{"role": "system", "content": system}, *messages]
        return Grounding(grounded, citations)


def _question(messages: list[dict[str, Any]]) -> str:
    """The last user message with text: what a knowledge-base model searches for."""
    query = next((m["content"] for m in reversed(messages) if m["role"] == "user" and m["content"].strip()), None)
    if query is None:
        raise ValueError("messages: a knowledge-base model needs a user message to search for")
    return query
