"""Data augmentation: EDA, back-translation and long-tail oversampling with class weights.

- **EDA** (easy data augmentation): synonym replacement from a synonym dictionary (a small finance
  list ships in `lmsmith/data/resources/finance_synonyms.yaml`; pass your own), random insertion of a
  synonym, random swap and random deletion of words. `jieba` segments Chinese into words (dictionary
  words are added to it so that `归母净利润` stays one word). Numbers, amounts, percentages, codes and
  punctuation are never swapped, deleted or split, so a fact stays a fact. Every variant is drawn from a
  `random.Random` seeded by (seed, record id, variant number): the same input gives the same output.
- **Back-translation**: source → pivot language → source through any OpenAI-compatible
  `/chat/completions` endpoint (`httpx`), e.g. `lmsmith serve` or vLLM.
- **Oversampling**: copies of long-tail categories until the distribution matches a target (uniform or
  given shares), and the class weights of the result written out for training.

Rows are the data stage's: corpus `{"id", "text", ...}` or conversations `{"id", "task", "messages",
"answer"}`; for conversations only the user turns are rewritten (the reference answer and the ground
truth stay as they are). A new row's id is `<source id>#<method><n>` and it carries
`"augmented": {"method", "source_id", ...}`.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import httpx
from pydantic import Field, SecretStr, field_validator

from lmsmith.console import track
from lmsmith.data.resources import YamlFile, read_term_list, read_yaml, resource_path
from lmsmith.jsonl import write_json
from lmsmith.errors import UserError
from lmsmith.schema import StrictModel

EdaOperation = Literal["synonym", "insert", "swap", "delete"]

# ------------------------------------------------------------------------------------ synonym dictionary


class SynonymDictionary:
    """Word → its synonyms. Read from YAML: a list of groups (`- [营业收入, 营收]`, every word may replace
    any other in its group) or a mapping (`营业收入: [营收]`, one direction only)."""

    def __init__(self, synonyms: dict[str, list[str]]):
        self.synonyms = {word: sorted(set(options) - {word}) for word, options in synonyms.items()}
        self.synonyms = {word: options for word, options in self.synonyms.items() if options}

    @property
    def words(self) -> set[str]:
        return set(self.synonyms) | {option for options in self.synonyms.values() for option in options}

    @classmethod
    def load(cls, path: Optional[str | Path] = None) -> "SynonymDictionary":
        source = read_yaml(path or resource_path("finance_synonyms.yaml"))
        return cls(_parse_synonyms(source))


def _word(value: Any, source: YamlFile, *key: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{source.where(*key)}: a synonym must be a non-empty string, got {value!r}")
    return value.strip()


def _parse_synonyms(source: YamlFile) -> dict[str, list[str]]:
    data = source.data
    synonyms: dict[str, list[str]] = {}
    if isinstance(data, list):
        for index, group in enumerate(data):
            if not isinstance(group, list) or len(group) < 2:
                raise UserError(f"{source.where(index)}: a synonym group must be a list of at least two words")
            words = [_word(word, source, index, position) for position, word in enumerate(group)]
            for word in words:
                synonyms.setdefault(word, []).extend(w for w in words if w != word)
    elif isinstance(data, dict):
        for word, options in data.items():
            key = _word(word, source, word)
            if not isinstance(options, list) or not options:
                raise UserError(f"{source.where(word)}: '{key}' must map to a list of synonyms")
            synonyms.setdefault(key, []).extend(_word(o, source, word, i) for i, o in enumerate(options))
    else:
        raise UserError(f"{source.where()}: expected a list of synonym groups or a mapping word: [synonyms]")
    if not synonyms:
        raise UserError(f"{source.where()}: the synonym dictionary is empty")
    return synonyms


# ------------------------------------------------------------------------------------------------- EDA


class EdaConfig(StrictModel):
    """EDA settings. Each variant applies one operation; `num_aug` variants per record cycle through
    `operations`."""

    synonyms: Optional[str] = Field(None, description="Synonym YAML; default: the shipped finance list.")
    protect: Optional[str] = Field(
        None, description="Extra words never deleted or swapped (one a line), e.g. your company names."
    )
    operations: list[EdaOperation] = Field(default_factory=lambda: ["synonym", "insert", "swap", "delete"], min_length=1)
    num_aug: int = Field(4, ge=1, le=64, description="Variants per record.")
    alpha: float = Field(0.1, gt=0, le=0.5, description="Share of words changed by synonym, insert and swap.")
    p_delete: float = Field(0.1, gt=0, le=0.5, description="Chance that each word is deleted.")
    seed: int = 0


# A token never touched: numbers (with their decimals, percent sign), ASCII codes (tickers, FY2023),
# whitespace and punctuation.
_PROTECTED = re.compile(r"^(?:.*\d.*|[A-Z0-9._-]+|\s+|[^\w]+)$")


@functools.lru_cache(maxsize=4)
def _jieba_with(words: frozenset[str]) -> Any:
    """A private jieba tokenizer that knows `words` (loading jieba's dictionary takes about a second, so
    tokenizers are shared by every `Eda` with the same words)."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    tokenizer = jieba.Tokenizer()  # not jieba's global one: the words added here stay here
    tokenizer.initialize()
    for word in sorted(words):
        if " " not in word:
            tokenizer.add_word(word, freq=100_000)
    return tokenizer


class Eda:
    """EDA over jieba-segmented text (see the module docstring)."""

    def __init__(self, config: EdaConfig):
        self.config = config
        self.dictionary = SynonymDictionary.load(config.synonyms)
        self.protected_words = set(read_term_list(config.protect)) if config.protect else set()
        self._tokenizer = _jieba_with(frozenset(self.dictionary.words | self.protected_words))
        # Phrases that span several jieba tokens (English "net profit"), found by their first character.
        self._phrases: dict[str, list[str]] = {}
        for phrase in sorted(self.dictionary.words | self.protected_words, key=len, reverse=True):
            self._phrases.setdefault(phrase[0], []).append(phrase)

    def tokens(self, text: str) -> list[str]:
        """jieba's words, with dictionary phrases merged back into one token each."""
        pieces = self._tokenizer.lcut(text)
        starts, position = [], 0
        for piece in pieces:
            starts.append(position)
            position += len(piece)
        boundaries = {start: index for index, start in enumerate(starts)}
        boundaries[len(text)] = len(pieces)
        merged, index = [], 0
        while index < len(pieces):
            start = starts[index]
            match = next(
                (p for p in self._phrases.get(text[start], []) if text.startswith(p, start) and start + len(p) in boundaries),
                None,
            )
            end = boundaries[start + len(match)] if match else index + 1
            merged.append(text[start:start + len(match)] if match else pieces[index])
            index = max(end, index + 1)
        return merged

    def _editable(self, tokens: list[str]) -> list[int]:
        """Indices of the words EDA may swap or delete: not protected, and not the unit right after a
        number (`亿元` in `12.35亿元`, `年` in `2023年`, `billion` in `1.2 billion`)."""
        editable, previous = [], ""
        for index, token in enumerate(tokens):
            if not _PROTECTED.match(token) and token not in self.protected_words and not re.search(r"\d", previous):
                editable.append(index)
            if not token.isspace():
                previous = token
        return editable

    def _changes(self, words: int) -> int:
        return max(1, int(round(self.config.alpha * words)))

    def synonym_replace(self, tokens: list[str], rng: random.Random) -> list[str]:
        candidates = [i for i in self._editable(tokens) if tokens[i] in self.dictionary.synonyms]
        rng.shuffle(candidates)
        result = list(tokens)
        for index in candidates[:self._changes(len(self._editable(tokens)))]:
            result[index] = rng.choice(self.dictionary.synonyms[tokens[index]])
        return result

    def random_insert(self, tokens: list[str], rng: random.Random) -> list[str]:
        candidates = [tokens[i] for i in self._editable(tokens) if tokens[i] in self.dictionary.synonyms]
        if not candidates:
            return list(tokens)
        spaced = any(t.isspace() for t in tokens)
        # Between words only: after a space where words are spaced, else after a word or a sentence
        # punctuation mark (never inside `600123.SH` or between `12.35` and `亿元`).
        editable = set(self._editable(tokens))
        if spaced:
            slots = [0] + [
                i + 1 for i, t in enumerate(tokens)
                if t.isspace() and i > 0 and (i - 1 in editable or tokens[i - 1] in ",;.")
                and not (i + 1 < len(tokens) and re.search(r"\d", tokens[i + 1]))
            ]
        else:
            slots = [0] + [i + 1 for i, t in enumerate(tokens) if i in editable or t in "，。；！？,;"]
        result = list(tokens)
        for slot in sorted(rng.sample(slots, min(len(slots), self._changes(len(editable)))), reverse=True):
            word = rng.choice(self.dictionary.synonyms[rng.choice(candidates)])
            result[slot:slot] = [word, " "] if spaced else [word]
        return result

    def random_swap(self, tokens: list[str], rng: random.Random) -> list[str]:
        editable = self._editable(tokens)
        result = list(tokens)
        if len(editable) < 2:
            return result
        for _ in range(self._changes(len(editable))):
            a, b = rng.sample(editable, 2)
            result[a], result[b] = result[b], result[a]
        return result

    def random_delete(self, tokens: list[str], rng: random.Random) -> list[str]:
        editable = self._editable(tokens)
        if len(editable) < 2:
            return list(tokens)
        doomed = {i for i in editable if rng.random() < self.config.p_delete}
        if len(doomed) == len(editable):
            doomed.discard(rng.choice(editable))  # never delete every word
        return [t for i, t in enumerate(tokens) if i not in doomed]

    def augment_text(self, text: str, operation: EdaOperation, rng: random.Random) -> str:
        """One variant of `text` made with one operation."""
        tokens = self.tokens(text)
        apply = {"synonym": self.synonym_replace, "insert": self.random_insert,
                 "swap": self.random_swap, "delete": self.random_delete}[operation]
        text = re.sub(r"(?<=\S) {2,}(?=\S)", " ", "".join(apply(tokens, rng)))
        return re.sub(r"(?<=\w) +(?=[,.;:!?](?:\s|$))", "", text).strip()  # no space left before a full stop

    def variants(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Up to `num_aug` new rows for `row` (variants equal to the original or to each other are left out)."""
        source_id = str(row.get("id"))
        seen = {_rewritable_text(row)}
        rows = []
        for number in range(self.config.num_aug):
            operation = self.config.operations[number % len(self.config.operations)]
            rng = random.Random(f"{self.config.seed}:{source_id}:{number}")
            variant = _rewrite_row(row, lambda text: self.augment_text(text, operation, rng))
            text = _rewritable_text(variant)
            if text in seen:
                continue
            seen.add(text)
            variant["id"] = f"{source_id}#eda{number}"
            variant["augmented"] = {"method": "eda", "operation": operation, "source_id": source_id}
            rows.append(variant)
        return rows


def _rewritable_text(row: dict[str, Any]) -> str:
    if "messages" in row:
        return "\n".join(m["content"] for m in row["messages"] if m.get("role") == "user")
    return str(row.get("text", ""))


def _rewrite_row(row: dict[str, Any], rewrite: Any) -> dict[str, Any]:
    """A deep copy of `row` with its text (corpus) or its user turns (conversation) rewritten."""
    new = copy.deepcopy(row)
    new.pop("augmented", None)
    if "messages" in new:
        for message in new["messages"]:
            if message.get("role") == "user":
                message["content"] = rewrite(message["content"])
    else:
        new["text"] = rewrite(str(new.get("text", "")))
    return new


# ------------------------------------------------------------------------------------ back-translation


class BackTranslationConfig(StrictModel):
    """An OpenAI-compatible endpoint and the languages to go through."""

    base_url: str = Field(..., description="The API root, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(..., description="The `model` sent with each request.")
    api_key: Optional[SecretStr] = Field(
        None, description="Bearer token; default (and better): the environment variable `api_key_env`. Never "
        "written to a dump, manifest or log.")
    api_key_env: str = "OPENAI_API_KEY"
    source_language: str = "Chinese"
    pivot_language: str = "English"
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(512, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(2, ge=0, le=10, description="Retries of a request that failed to connect or got a 5xx.")

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {value!r}")
        return value.rstrip("/")


class BackTranslator:
    """Translate through `/chat/completions` with httpx; `transport` lets tests talk to a fake server."""

    def __init__(self, config: BackTranslationConfig, transport: Optional[httpx.BaseTransport] = None):
        self.config = config
        key = config.api_key.get_secret_value() if config.api_key else os.environ.get(config.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(base_url=config.base_url, headers=headers, timeout=config.timeout_s, transport=transport)
        self.requests = 0

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "BackTranslator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def translate(self, text: str, target_language: str) -> str:
        body = {
            "model": self.config.model,
            "messages": [
                {"role": "system", "content": f"You are a translator. Translate the user's text into {target_language}. "
                 "Keep every number, amount, percentage, date and company name exactly. Output only the translation."},
                {"role": "user", "content": text},
            ],
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        for attempt in range(self.config.retries + 1):
            self.requests += 1
            try:
                response = self._client.post("/chat/completions", json=body)
            except httpx.TransportError as exc:
                if attempt == self.config.retries:
                    raise UserError(f"back_translation.base_url: cannot reach {self.config.base_url}: {exc}") from None
                continue
            if response.status_code >= 500 and attempt < self.config.retries:
                continue
            if response.status_code != 200:
                raise UserError(
                    f"back_translation: {self.config.base_url}/chat/completions answered {response.status_code}: "
                    f"{response.text[:300]}"
                )
            try:
                return str(response.json()["choices"][0]["message"]["content"] or "").strip()
            except (KeyError, IndexError, TypeError, ValueError):
                raise UserError(f"back_translation: not an OpenAI chat completion: {response.text[:300]}") from None
        raise AssertionError("unreachable")

    def back_translate(self, text: str) -> str:
        pivot = self.translate(text, self.config.pivot_language)
        return self.translate(pivot, self.config.source_language) if pivot else ""


def back_translate_rows(
    rows: Sequence[dict[str, Any]], config: BackTranslationConfig, transport: Optional[httpx.BaseTransport] = None
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """One back-translated row per input row (skipped when the round trip comes back empty or
    unchanged); returns (new rows, counts)."""
    new_rows: list[dict[str, Any]] = []
    counts = Counter()
    with BackTranslator(config, transport) as translator, track("back-translating", total=len(rows)) as bar:
        for row in rows:
            source_id = str(row.get("id"))
            variant = _rewrite_row(row, translator.back_translate)
            if not _rewritable_text(variant).strip() or _rewritable_text(variant) == _rewritable_text(row):
                counts["skipped"] += 1
            else:
                variant["id"] = f"{source_id}#bt"
                variant["augmented"] = {"method": "back_translation", "pivot": config.pivot_language, "source_id": source_id}
                new_rows.append(variant)
                counts["produced"] += 1
            bar.advance()
        counts["requests"] = translator.requests
    return new_rows, dict(counts)


# ----------------------------------------------------------------------------------------- oversampling


class OversampleConfig(StrictModel):
    """Copy records of under-represented categories until `field`'s distribution matches `target`."""

    field: str = Field("task", description="The record field holding the category.")
    target: Union[Literal["uniform"], dict[str, float]] = Field(
        "uniform", description="'uniform', or category → share (normalised; unlisted categories keep their count)."
    )
    max_factor: float = Field(10.0, ge=1, description="A category grows to at most this many times its size.")
    diversify: bool = Field(False, description="Pass each copy through one EDA operation instead of copying it verbatim.")
    seed: int = 0

    @field_validator("target")
    @classmethod
    def _shares(cls, value: Union[str, dict[str, float]]) -> Union[str, dict[str, float]]:
        if isinstance(value, dict):
            if not value or any(share < 0 for share in value.values()) or sum(value.values()) <= 0:
                raise ValueError("target shares must be non-negative with a positive sum")
        return value


def target_counts(counts: dict[str, int], config: OversampleConfig) -> dict[str, int]:
    """Category → count after oversampling: the smallest sizes with the target proportions that shrink no
    category, each capped at `max_factor` times its size."""
    if config.target == "uniform":
        shares = {category: 1.0 for category in counts}
    else:
        unknown = sorted(set(config.target) - set(counts))
        if unknown:
            raise UserError(f"oversample.target: no record has {config.field} = {', '.join(unknown)}")
        shares = {category: share for category, share in config.target.items() if share > 0}
    total_share = sum(shares.values())
    scale = max(counts[category] / (share / total_share) for category, share in shares.items())
    wanted = dict(counts)
    for category, share in shares.items():
        goal = int(round(scale * share / total_share))
        wanted[category] = min(max(goal, counts[category]), int(counts[category] * config.max_factor))
    return wanted


def class_weights(counts: dict[str, int]) -> dict[str, float]:
    """Balanced weights, total / (categories × count): rarer categories weigh more, the mean is 1."""
    total = sum(counts.values())
    return {category: round(total / (len(counts) * count), 6) for category, count in sorted(counts.items()) if count}


def oversample(
    rows: Sequence[dict[str, Any]], config: OversampleConfig, eda: Optional[Eda] = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the rows plus the copies, the class-weight report). Copies are drawn round-robin from a shuffled
    list of each category's records, so every record is copied about as often as the others."""
    missing = [i for i, row in enumerate(rows) if row.get(config.field) in (None, "")]
    if missing:
        raise UserError(f"oversample.field: record {missing[0]} (id {rows[missing[0]].get('id')}) has no '{config.field}'")
    members: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        members.setdefault(str(row[config.field]), []).append(row)
    before = {category: len(group) for category, group in sorted(members.items())}
    wanted = target_counts(before, config)
    rng = random.Random(config.seed)
    result = list(rows)
    with track("oversampling", total=sum(wanted.values()) - sum(before.values())) as bar:
        for category, group in members.items():
            order = list(group)
            rng.shuffle(order)
            for number in range(wanted[category] - before[category]):
                source = order[number % len(order)]
                source_id = str(source.get("id"))
                if config.diversify and eda is not None:
                    operation = eda.config.operations[number % len(eda.config.operations)]
                    copy_rng = random.Random(f"{config.seed}:{source_id}:os{number}")
                    new = _rewrite_row(source, lambda text: eda.augment_text(text, operation, copy_rng))
                else:
                    new = copy.deepcopy(source)
                new["id"] = f"{source_id}#os{number // len(order)}"
                new["augmented"] = {"method": "oversample", "source_id": source_id}
                result.append(new)
                bar.advance()
    after = dict(sorted(Counter(str(row[config.field]) for row in result).items()))
    report = {
        "field": config.field,
        "formula": "weight = total / (categories × count)",
        "counts_before": before,
        "counts_after": after,
        "weights": class_weights(after),
        "weights_without_oversampling": class_weights(before),
    }
    return result, report


# ---------------------------------------------------------------------------------------- all together


class AugmentConfig(StrictModel):
    """Which augmentations to run, in this order: EDA and back-translation on the input records, then
    oversampling over everything (so the final distribution is the target one)."""

    eda: Optional[EdaConfig] = None
    back_translation: Optional[BackTranslationConfig] = None
    oversample: Optional[OversampleConfig] = None


def augment(
    rows: Sequence[dict[str, Any]], config: AugmentConfig, out_dir: Optional[str | Path] = None,
    transport: Optional[httpx.BaseTransport] = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the configured augmentations; returns (all rows: originals first, then new ones; counts).
    With `out_dir`, `class_weights.json` is written there when oversampling ran."""
    result = [copy.deepcopy(row) for row in rows]
    counts: dict[str, Any] = {"input": len(rows)}
    # Diversified oversampling copies go through EDA too (with its defaults when EDA itself is off).
    needs_eda = config.eda or (config.oversample and config.oversample.diversify)
    eda = Eda(config.eda or EdaConfig()) if needs_eda else None
    if config.eda:
        assert eda is not None
        new_rows = []
        with track("EDA", total=len(rows)) as bar:
            for row in rows:
                new_rows.extend(eda.variants(row))
                bar.advance()
        result.extend(new_rows)
        counts["eda"] = len(new_rows)
        counts["eda_by_operation"] = dict(Counter(row["augmented"]["operation"] for row in new_rows))
    if config.back_translation:
        new_rows, bt_counts = back_translate_rows(rows, config.back_translation, transport)
        result.extend(new_rows)
        counts["back_translation"] = bt_counts
    if config.oversample:
        before = len(result)
        result, weights = oversample(result, config.oversample, eda)
        counts["oversample"] = len(result) - before
        counts["class_weights"] = weights
        if out_dir is not None:
            write_json(Path(out_dir) / "class_weights.json", weights)
    counts["output"] = len(result)
    return result, counts


def parse_target(value: str) -> Union[str, dict[str, float]]:
    """`uniform` or `a=0.5,b=0.3,c=0.2` (the CLI's form of `OversampleConfig.target`)."""
    if value == "uniform":
        return value
    shares = {}
    for part in value.split(","):
        name, _, share = part.partition("=")
        try:
            shares[name.strip()] = float(share)
        except ValueError:
            raise UserError(f"--target: expected 'uniform' or 'name=share,...', got {value!r}") from None
    return shares


def read_weights(path: str | Path) -> dict[str, float]:
    """The `weights` of a class_weights.json written by `oversample` (for the training stage)."""
    try:
        return dict(json.loads(Path(path).read_text(encoding="utf-8"))["weights"])
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"{path}: not a class_weights.json ({exc})") from None
