"""Moderation by term list, on requests and on answers (streams included).

Text is folded before matching, one character at a time so every match maps back to the characters the
user wrote: NFKC (full-width letters and digits become half-width), traditional Chinese to simplified
(`zhconv`), case-folded. An Aho-Corasick automaton (`pyahocorasick`) finds every listed term in one
pass. Actions: `block` (a request gets 400 `content_filter`; an answer stops there with
`finish_reason: content_filter`), `mask` (the matched characters become `*`), `flag` (passes, and the
decision is counted and audited).

A classifier trained by lmsmith's own pipeline (`lmsmith.gateway.classifier`) may add a second check on
request text: a user message the term list lets through, but the classifier scores at or above its
threshold, is blocked or flagged. Answers are checked by the term list only (a classifier reads whole
texts, a stream arrives in pieces).

A stream is checked as it goes: the last (longest term − 1) characters are held back until the next
piece shows whether they begin a listed term, so no part of a blocked term ever reaches the client.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Optional, Sequence

from lmsmith.errors import UserError

Action = Literal["block", "mask", "flag", "off"]
DEFAULT_TERMS = Path(__file__).with_name("moderation_terms.txt")
MASK = "*"


@lru_cache(maxsize=65536)
def fold_char(char: str) -> str:
    import zhconv

    return zhconv.convert(unicodedata.normalize("NFKC", char), "zh-cn").casefold()


def fold(text: str) -> tuple[str, list[int]]:
    """(the folded text, for each folded character the index of the original character it came from)."""
    pieces, origin = [], []
    for index, char in enumerate(text):
        folded = fold_char(char)
        pieces.append(folded)
        origin.extend([index] * len(folded))
    return "".join(pieces), origin


def read_terms(path: str | Path) -> list[str]:
    """One term per line; blank lines and `#` comments skipped."""
    chosen = DEFAULT_TERMS if str(path) == "default" else Path(path)
    try:
        lines = chosen.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"{chosen}: cannot read the moderation term list ({exc.strerror or exc})") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


@dataclass(frozen=True)
class Decision:
    action: str  # allow, flag, mask or block
    terms: tuple[str, ...] = ()
    text: str = ""  # the text to use (masked when the action is mask)


class TermModerator:
    """The term list, and optionally the trained classifier (`lmsmith.gateway.classifier`) on requests."""

    def __init__(self, terms: Sequence[str], input_action: Action = "block", output_action: Action = "block",
                 classifier=None, classifier_action: Literal["block", "flag"] = "block"):
        import ahocorasick

        folded = sorted({fold(term)[0] for term in terms if term.strip()})
        if not folded and classifier is None:
            raise UserError("moderation: the term list is empty and no classifier is given")
        self.automaton = None
        if folded:
            self.automaton = ahocorasick.Automaton()
            for term in folded:
                self.automaton.add_word(term, term)
            self.automaton.make_automaton()
        self.longest = max((len(term) for term in folded), default=1)
        self.input_action, self.output_action = input_action, output_action
        self.classifier, self.classifier_action = classifier, classifier_action

    def classify(self, text: str, action: Action) -> Decision:
        """The term decision, then (when it allows) the classifier's on the whole text."""
        decision = self.decide(text, action)
        if decision.action == "allow" and self.classifier is not None and action != "off" and text.strip():
            if self.classifier.flags(text):
                return Decision(self.classifier_action, ("<classifier>",), text)
        return decision

    def spans(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, folded term) of every match, in original-text character positions."""
        if self.automaton is None:
            return []
        folded, origin = fold(text)
        found = []
        for end, term in self.automaton.iter(folded):
            start = end - len(term) + 1
            found.append((origin[start], origin[end] + 1, term))
        return found

    def decide(self, text: str, action: Action) -> Decision:
        spans = self.spans(text) if action != "off" else []
        if not spans:
            return Decision("allow", (), text)
        terms = tuple(sorted({term for _, _, term in spans}))
        if action == "mask":
            chars = list(text)
            for start, end, _ in spans:
                chars[start:end] = MASK * (end - start)
            return Decision("mask", terms, "".join(chars))
        return Decision(action, terms, text)

    def stream(self, chunks: AsyncIterator[Any], on_decision) -> AsyncIterator[Any]:
        return ModeratedStream(self, chunks, on_decision)


class ModeratedStream:
    """An answer's chunks with the output action applied; closing it closes the answer underneath."""

    def __init__(self, moderator: TermModerator, chunks: AsyncIterator[Any], on_decision):
        self.moderator, self.chunks, self.on_decision = moderator, chunks, on_decision
        self.pending = ""  # received, not yet sent: may begin a listed term
        self.logprobs: list[Any] = []
        self.done = False
        self.decided: set[str] = set()

    def __aiter__(self) -> "ModeratedStream":
        return self

    async def aclose(self) -> None:
        await self.chunks.aclose()  # type: ignore[attr-defined]

    def _note(self, action: str) -> None:
        if action not in self.decided:
            self.decided.add(action)
            self.on_decision(action)

    async def __anext__(self) -> Any:
        if self.done:
            raise StopAsyncIteration
        while True:
            chunk = await self.chunks.__anext__()
            text = self.pending + chunk.text
            self.logprobs.extend(chunk.logprobs)
            action = self.moderator.output_action
            spans = self.moderator.spans(text) if action != "off" else []
            if spans and action == "block":
                cut = min(start for start, _, _ in spans)
                self._note("block")
                self.done = True
                await self.aclose()
                return replace(chunk, text=text[:cut], finish_reason="content_filter", logprobs=tuple(self.logprobs))
            if spans:
                self._note(action)
                if action == "mask":
                    text = self.moderator.decide(text, "mask").text
            final = chunk.finish_reason is not None
            keep = 0 if final else min(len(text), self.moderator.longest - 1)
            if not final and spans and action == "mask":
                keep = min(keep, len(text) - max(end for _, end, _ in spans))  # a masked term is never re-cut
            self.pending = text[len(text) - keep:] if keep else ""
            out = text[: len(text) - keep] if keep else text
            if out or final or chunk.prompt_logprobs is not None:
                sent, self.logprobs = tuple(self.logprobs), []
                if final:
                    self.done = True
                return replace(chunk, text=out, logprobs=sent)


def moderate_messages(moderator: TermModerator, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Decision]:
    """The request's messages with the input action applied, and the strongest decision taken."""
    rank = {"allow": 0, "flag": 1, "mask": 2, "block": 3}
    strongest = Decision("allow")
    changed = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, str):
            changed.append(message)
            continue
        decision = moderator.classify(content, moderator.input_action) if message.get("role") == "user" else \
            moderator.decide(content, moderator.input_action)
        if rank[decision.action] > rank[strongest.action]:
            strongest = decision
        changed.append({**message, "content": decision.text} if decision.action == "mask" else message)
    return changed, strongest


def moderator_from(terms: Optional[str], input_action: Action, output_action: Action,
                   classifier: Optional[str] = None, threshold: float = 0.5,
                   classifier_action: Literal["block", "flag"] = "block") -> Optional[TermModerator]:
    if (terms is None and classifier is None) or (input_action == "off" and output_action == "off"):
        return None
    model = None
    if classifier is not None:
        from lmsmith.gateway.classifier import ModerationClassifier

        model = ModerationClassifier(classifier, threshold)
    return TermModerator(read_terms(terms) if terms is not None else [], input_action, output_action, model,
                         classifier_action)
