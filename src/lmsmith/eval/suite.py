"""`lmsmith eval --task TASK.yaml --model MODEL ...`: every task against every local model, one table.

Models are named as `lmsmith serve` names them, plus one form for any stage output of a run:
- an HF model folder, or a compress-stage int8 folder;
- a run folder: its tuned (sft) model;
- `run:RUN#STAGE` or `run:RUN#STAGE/OUTPUT` (output `model` by default): `run:runs/demo#pretrain`;
- a peft adapter folder on the base its config names, or `BASE+ADAPTER`: merged into the base first
  (`lmsmith.train.export.merge_adapter`), its trainable parameters counted from the adapter's weights;
- an OpenAI-compatible URL, `http://host:8000/v1[#MODEL]` (`lmsmith.eval.endpoint`; the key comes from
  OPENAI_API_KEY): answers through chat completions, log-likelihoods through echoed prompt logprobs
  after a probe that refuses servers which do not return them.

Multiple choice is scored by the log-likelihood of each option's letter after the prompt
(`lmsmith.eval.likelihood`) and/or by a generated answer whose stated letter is read by
`lmsmith.eval.choices`; with `circular`, every rotation of the options is asked and an item counts only
when all are right. Generation tasks get BLEU-4, character ROUGE-L, chrF, exact match and the edit rate;
numeric tasks the share of answers whose number is the truth within `rel_tol`; classification tasks
accuracy, macro-F1 and a confusion matrix (labels by log-likelihood and/or named in a generated answer);
extraction tasks span-level entity precision, recall and F1 of the `TYPE：entity` lines the model
lists; perplexity tasks the perplexity of their documents.
Every score carries a bootstrap standard error. transformers runs the models (`lmsmith.generation`).
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field

from lmsmith.console import console
from lmsmith.errors import UserError
from lmsmith.eval.tasks import (
    ChoiceQuestion,
    LabeledText,
    RelevanceJudgement,
    Reference,
    TaggedSentence,
    TaskConfig,
    load_task,
    read_items,
)
from lmsmith.schema import StrictModel

LETTERS = "ABCDEFGH"


class SuiteConfig(StrictModel):
    """What `lmsmith eval` runs and where it writes."""

    task: list[str] = Field(..., description="Task YAML file, or finance-suite (the embedded finance tasks, "
                            "about companies held out of the embedded training data).")
    model: list[str] = Field(..., description="Model: an HF folder, a run folder (its tuned model), "
                             "run:RUN#STAGE[/OUTPUT], a peft adapter folder (on the base it names) or "
                             "BASE+ADAPTER, or an OpenAI-compatible URL http://HOST/v1[#MODEL].")
    out: Path = Field(Path("eval-results"), description="Folder for results.json and table.md.")
    batch_size: int = Field(16, ge=1, description="Sequences per forward pass.")
    speed_requests: int = Field(8, ge=0, description="Requests timed per model for tok/s and latency (0: no timing).")


def resolve_model_spec(spec: str) -> Path:
    """The folder a model spec names (see the module docstring)."""
    from lmsmith.artifacts import Manifest
    from lmsmith.models import resolve_model_dir

    if not spec.startswith("run:"):
        return resolve_model_dir(spec)
    run, sep, target = spec.removeprefix("run:").partition("#")
    if not sep or not target:
        raise UserError(f"--model {spec}: expected run:RUN#STAGE or run:RUN#STAGE/OUTPUT")
    stage, _, output = target.partition("/")
    stage_dir = Path(run).expanduser() / stage
    manifest = Manifest.read(stage_dir)
    if manifest is None:
        raise UserError(f"--model {spec}: {stage_dir} holds no finished stage (no manifest.json)")
    output = output or "model"
    if output not in manifest.outputs:
        raise UserError(f"--model {spec}: stage {stage} has no output {output!r} (has {', '.join(sorted(manifest.outputs))})")
    return manifest.output_path(stage_dir, output)


class LocalModel:
    """A model loaded here: log-likelihoods from its forward passes, answers from `generate_chat`."""

    def __init__(self, model, tokenizer, batch_size: int = 16, quiet: bool = False):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.quiet = quiet  # no progress bars (inside a training loop's own)

    def loglikelihoods(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        from lmsmith.eval.likelihood import continuation_logprobs

        return continuation_logprobs(self.model, self.tokenizer, pairs, self.batch_size)

    def choice_scores(self, prompts: Sequence[str], letter_sets: Sequence[str],
                      delimiter: str = " ") -> tuple[list[list[float]], str]:
        return _letters_by_likelihood(self, prompts, letter_sets, delimiter), "loglikelihood"

    def uneven_letters(self, prompt: str, letters: str, delimiter: str = " ") -> bool:
        """Whether the letters' continuations take different numbers of tokens after `prompt`."""
        from lmsmith.eval.likelihood import split_pair

        return len({len(split_pair(self.tokenizer, prompt, f"{delimiter}{letter}")[1]) for letter in letters}) > 1

    def answers(self, conversations: Sequence[Sequence[dict]], max_new_tokens: int, progress: str) -> list[str]:
        from lmsmith.generation import generate_chat

        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"{progress}: answers are asked through the chat template, and this tokenizer has none")
        return generate_chat(self.model, self.tokenizer, [list(c) for c in conversations],
                             max_new_tokens=max_new_tokens, batch_size=self.batch_size,
                             progress=None if self.quiet else progress).texts

    def perplexity(self, documents: Sequence[str], progress: str) -> dict[str, Any]:
        from lmsmith.eval.metrics import perplexity

        result = perplexity(self.model, self.tokenizer, documents, batch_size=self.batch_size,
                            progress=None if self.quiet else progress)
        return {"perplexity": result.perplexity, "tokens": result.tokens}


class RemoteModel:
    """An OpenAI-compatible server (`lmsmith.eval.endpoint`)."""

    def __init__(self, endpoint):
        self.endpoint = endpoint

    def loglikelihoods(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        return self.endpoint.continuation_logprobs(pairs)

    def choice_scores(self, prompts: Sequence[str], letter_sets: Sequence[str],
                      delimiter: str = " ") -> tuple[list[list[float]], str]:
        route = self.endpoint.choice_route()
        if route == "completions":
            return _letters_by_likelihood(self, prompts, letter_sets, delimiter), "loglikelihood"
        return self.endpoint.letter_logprobs(prompts, letter_sets), route

    def uneven_letters(self, prompt: str, letters: str, delimiter: str = " ") -> bool:
        return False  # the server's tokenizer is its own business

    def answers(self, conversations: Sequence[Sequence[dict]], max_new_tokens: int, progress: str) -> list[str]:
        return self.endpoint.chat(conversations, max_new_tokens)

    def perplexity(self, documents: Sequence[str], progress: str) -> dict[str, Any]:
        import math

        self.endpoint.check_prompt_logprobs()
        total, count = 0.0, 0
        for document in documents:
            values, _ = self.endpoint._prompt_logprobs(document)
            scored = [value for value in values[1:] if value is not None]
            total, count = total - sum(scored), count + len(scored)
        return {"perplexity": math.exp(total / count) if count else None, "tokens": count}


def _letters_by_likelihood(backend, prompts: Sequence[str], letter_sets: Sequence[str],
                           delimiter: str = " ") -> list[list[float]]:
    """Each option letter's log-likelihood as the continuation " A", " B", ... (`delimiter` + letter) of its
    question's prompt."""
    flat = backend.loglikelihoods([(prompt, f"{delimiter}{letter}") for prompt, letters in zip(prompts, letter_sets)
                                   for letter in letters])
    grouped, at = [], 0
    for letters in letter_sets:
        grouped.append(flat[at: at + len(letters)])
        at += len(letters)
    return grouped


def letters_for(options: Sequence[str]) -> str:
    if len(options) > len(LETTERS):
        raise UserError(f"a question has {len(options)} options; at most {len(LETTERS)} are supported")
    return LETTERS[: len(options)]


def format_question(task: TaskConfig, question: str, options: Sequence[str]) -> str:
    lines = "\n".join(f"{letter}. {option}" for letter, option in zip(letters_for(options), options))
    return task.template.format(question=question, options=lines)


def rotations(item: ChoiceQuestion, circular: bool) -> list[tuple[tuple[str, ...], int]]:
    """(options, gold index) of every rotation asked: all of them when circular, else the item as given."""
    count = len(item.options) if circular else 1
    return [(item.options[shift:] + item.options[:shift], (item.gold - shift) % len(item.options))
            for shift in range(count)]


def split_shots(task: TaskConfig, items: list) -> tuple[list, list]:
    """(few-shot examples, items to score)."""
    if not task.few_shot:
        return [], items[: task.limit] if task.limit else items
    if task.few_shot_file is not None:
        shots = read_items(task, task.few_shot_file)[: task.few_shot]
        scored = items
    else:
        shots, scored = items[: task.few_shot], items[task.few_shot:]
    if len(shots) < task.few_shot:
        raise UserError(f"{task.name}: few_shot {task.few_shot}, but only {len(shots)} examples to take them from")
    if not scored:
        raise UserError(f"{task.name}: no items left to score after the {task.few_shot} few-shot examples")
    return shots, scored[: task.limit] if task.limit else scored


def _shot_block(task: TaskConfig, shots: Sequence[ChoiceQuestion]) -> str:
    return "".join(format_question(task, shot.question, shot.options) + letters_for(shot.options)[shot.gold]
                   + "\n\n" for shot in shots)


def _mean_with_stderr(values: list[float]) -> tuple[float, float | None]:
    from lmsmith.eval.stats import bootstrap_stderr

    return (sum(values) / len(values) if values else 0.0), bootstrap_stderr(values)


def score_multiple_choice(task: TaskConfig, backend, items: list[ChoiceQuestion], shots: list) -> dict[str, Any]:
    from lmsmith.eval.choices import extract_choice

    block = _shot_block(task, shots)
    asked = [(index, options, gold) for index, item in enumerate(items)
             for options, gold in rotations(item, task.circular)]
    prompts = [block + format_question(task, items[index].question, options) for index, options, _ in asked]
    scores: dict[str, Any] = {"items": len(items), "rotations": len(asked) // len(items)}
    if "loglikelihood" in task.scoring:
        from lmsmith.eval.likelihood import best_per_group

        grouped, route = backend.choice_scores(prompts, [letters_for(options) for _, options, _ in asked],
                                               task.target_delimiter)
        if backend.uneven_letters(prompts[0], letters_for(asked[0][1]), task.target_delimiter):
            scores["ll_uneven_letters"] = True  # see TaskConfig.target_delimiter
        flat = [score for group in grouped for score in group]
        right: dict[int, list[bool]] = {}
        unscored = 0  # no option letter among the chat fallback's top tokens: wrong, never a guess of "A"
        best_options = best_per_group(flat, [len(options) for _, options, _ in asked])
        for (index, _, gold), best, group in zip(asked, best_options, grouped):
            missing = all(score == float("-inf") for score in group)
            unscored += missing
            right.setdefault(index, []).append(best == gold and not missing)
        scores["acc_route"] = route
        # A model that always picks one letter shows as such (tiny models often do).
        picked = [letters_for(options)[best] for (_, options, _), best, group in zip(asked, best_options, grouped)
                  if any(score != float("-inf") for score in group)]  # an unscored question picked nothing
        scores["ll_letter_distribution"] = {letter: picked.count(letter) for letter in sorted(set(picked))}
        if route != "loglikelihood":
            scores["unscored_rate"] = 100.0 * unscored / len(asked)
        values = [100.0 * all(marks) for _, marks in sorted(right.items())]
        scores["acc"], scores["acc_stderr"] = _mean_with_stderr(values)
    if "generate" in task.scoring:
        texts = backend.answers([[{"role": "user", "content": prompt}] for prompt in prompts], task.max_new_tokens,
                                f"{task.name}: answers")
        right, failures, letters = {}, 0, {}
        for (index, options, gold), text in zip(asked, texts):
            picked = extract_choice(text, letters_for(options))
            failures += picked is None
            if picked is not None:
                letters[picked] = letters.get(picked, 0) + 1
            right.setdefault(index, []).append(picked == letters_for(options)[gold])
        values = [100.0 * all(marks) for _, marks in sorted(right.items())]
        scores["gen_acc"], scores["gen_acc_stderr"] = _mean_with_stderr(values)
        scores["extraction_failure_rate"] = 100.0 * failures / len(asked)
        scores["letter_distribution"] = dict(sorted(letters.items()))
    return scores


def answer_items(task: TaskConfig, backend, items: list[Reference],
                 shared: dict[str, Any] | None = None) -> tuple[list[str], list[Any]]:
    """The model's answers, and each item's grounding when the task has a kb (else None): the kb's chunks go
    into the prompt as `lmsmith serve --kb` puts them, and a question the kb cannot back gets its refusal
    without asking the model. The groundings do not depend on the model: `shared` keeps them for the next
    model of one comparison."""
    if task.kb is None:
        return backend.answers([item.messages for item in items], task.max_new_tokens,
                               f"{task.name}: answers"), [None] * len(items)
    from lmsmith.rag.grounding import GroundedModel, RagSettings

    shared = {} if shared is None else shared
    key = f"groundings:{task.name}"
    if key not in shared:
        grounded = GroundedModel(task.name, task.kb, RagSettings(top_k=task.kb_top_k))
        shared[key] = grounded.ground_many([list(item.messages) for item in items])
    groundings = shared[key]
    asked = [index for index, grounding in enumerate(groundings) if grounding.refusal is None]
    texts = backend.answers([groundings[index].messages for index in asked], task.max_new_tokens,
                            f"{task.name}: answers with {Path(task.kb).name}")
    answers = [grounding.refusal or "" for grounding in groundings]
    for index, text in zip(asked, texts):
        answers[index] = text
    return answers, groundings


def kb_scores(groundings: list[Any], answers: list[str], truths: list[float], rel_tol: float) -> dict[str, Any]:
    """How the kb served a numeric task: context_recall (the retrieved chunks state the truth), refusals,
    citation_rate (answers citing a chunk as [n]) and citation_precision (cited chunks that state the truth)."""
    import re

    from lmsmith.eval.metrics import holds_number

    recall = [100.0 * any(holds_number(c["text"], truth, rel_tol) for c in g.citations)
              for g, truth in zip(groundings, truths)]
    scores: dict[str, Any] = {}
    scores["context_recall"], scores["context_recall_stderr"] = _mean_with_stderr(recall)
    scores["refusal_rate"] = 100.0 * sum(g.refusal is not None for g in groundings) / len(groundings)
    cited_total = cited_right = citing = 0
    for grounding, answer, truth in zip(groundings, answers, truths):
        numbers = {int(n) for n in re.findall(r"\[(\d+)\]", answer)}
        cited = [c for c in grounding.citations if c["index"] in numbers]
        citing += bool(cited)
        cited_total += len(cited)
        cited_right += sum(holds_number(c["text"], truth, rel_tol) for c in cited)
    scores["citation_rate"] = 100.0 * citing / len(groundings)
    scores["citation_precision"] = 100.0 * cited_right / cited_total if cited_total else None
    return scores


def score_generation(task: TaskConfig, backend, items: list[Reference],
                     shared: dict[str, Any] | None = None) -> dict[str, Any]:
    from lmsmith.eval.metrics import bleu4, chrf, corpus_statistics, edit_rates, exact_match, rouge_l_scores
    from lmsmith.eval.stats import bootstrap_stderr_of_sums

    answers, _ = answer_items(task, backend, items, shared)
    references = [item.reference for item in items]
    scores: dict[str, Any] = {"items": len(items)}
    for name, values in (("rougeL", rouge_l_scores(answers, references)), ("exact_match", exact_match(answers, references)),
                         ("edit_rate", edit_rates(answers, references))):
        scores[name], scores[f"{name}_stderr"] = _mean_with_stderr(values)
    for name, corpus_metric in (("bleu4", bleu4), ("chrf", chrf)):
        scores[name] = corpus_metric(answers, references)
        stats, from_sums = corpus_statistics(name, answers, references)
        scores[f"{name}_stderr"] = bootstrap_stderr_of_sums(stats, from_sums)
    scores["samples"] = [{"id": item.id, "answer": answer, "reference": item.reference}
                         for item, answer in zip(items[:5], answers)]
    return scores


def score_numeric(task: TaskConfig, backend, items: list[Reference],
                  shared: dict[str, Any] | None = None) -> dict[str, Any]:
    from lmsmith.eval.metrics import extract_number, numeric_match

    truths = []
    for item in items:
        truth = item.value if item.value is not None else extract_number(item.reference)
        if truth is None:
            raise UserError(f"{task.dataset}: item {item.id} has no numeric truth (answer.value, or a number in "
                            "its reference)")
        truths.append(truth)
    texts, groundings = answer_items(task, backend, items, shared)
    values = [100.0 * numeric_match(text, truth, task.rel_tol) for text, truth in zip(texts, truths)]
    scores: dict[str, Any] = {"items": len(items)}
    scores["numeric_acc"], scores["numeric_acc_stderr"] = _mean_with_stderr(values)
    scores["no_number_rate"] = 100.0 * sum(extract_number(text) is None for text in texts) / len(items)
    if task.kb is not None:
        scores |= kb_scores(groundings, texts, truths, task.rel_tol)
    return scores


def score_retrieval(task: TaskConfig, backend, items: list[RelevanceJudgement]) -> dict[str, Any]:
    """recall_at_k (share of an item's relevant documents in the top k), MRR (1 / rank of the first relevant
    document, 0 past the candidates) and ndcg_at_k (binary gains), each with a bootstrap standard error;
    documents are ranked by their best chunk."""
    from lmsmith.rag.config import SearchConfig
    from lmsmith.rag.kb import KnowledgeBase

    kb = KnowledgeBase.open(task.kb)
    k = task.retrieval_k
    settings = SearchConfig(k=max(k * 4, 50), candidates=max(k * 4, 50))
    recall, mrr, ndcg = [], [], []
    for item, hits in zip(items, kb.search_many([item.query for item in items], settings)):
        ranked: list[str] = []
        for hit in hits:
            if hit.chunk["doc_id"] not in ranked:
                ranked.append(hit.chunk["doc_id"])
        relevant = set(item.relevant)
        recall.append(100.0 * len(relevant & set(ranked[:k])) / len(relevant))
        first = next((rank for rank, doc in enumerate(ranked, start=1) if doc in relevant), None)
        mrr.append(100.0 / first if first else 0.0)
        gain = sum(1 / math.log2(rank + 1) for rank, doc in enumerate(ranked[:k], start=1) if doc in relevant)
        ideal = sum(1 / math.log2(rank + 1) for rank in range(1, min(len(relevant), k) + 1))
        ndcg.append(100.0 * gain / ideal)
    scores: dict[str, Any] = {"items": len(items), "k": k}
    for name, values in (("recall_at_k", recall), ("mrr", mrr), ("ndcg_at_k", ndcg)):
        scores[name], scores[f"{name}_stderr"] = _mean_with_stderr(values)
    return scores


def _label_in(text: str, labels: Sequence[str]) -> str | None:
    """The label an answer names: the one whose last mention comes last (longer labels first, so 中性偏多
    is not read as 中性)."""
    best, at = None, -1
    for label in sorted(labels, key=len, reverse=True):
        position = text.rfind(label)
        if position > at:
            best, at = label, position
    return best


def score_classification(task: TaskConfig, backend, items: list[LabeledText]) -> dict[str, Any]:
    from lmsmith.eval.labels import classification_scores

    labels = task.labels or sorted({item.label for item in items})
    unknown = sorted({item.label for item in items} - set(labels))
    if unknown:
        raise UserError(f"{task.dataset}: labels {unknown} are not in the task's labels {labels}")
    prompts = [task.template.format(text=item.text, labels="/".join(labels)) for item in items]
    gold = [item.label for item in items]
    scores: dict[str, Any] = {"items": len(items), "labels": labels}
    if "loglikelihood" in task.scoring:
        from lmsmith.eval.likelihood import best_per_group

        flat = backend.loglikelihoods([(prompt, label) for prompt in prompts for label in labels])
        picked = [labels[best] for best in best_per_group(flat, [len(labels)] * len(items))]
        result = classification_scores(gold, picked, labels)
        scores.update({"acc": 100.0 * result["accuracy"], "macro_f1": 100.0 * result["macro_f1"],
                       "confusion": result["confusion"]})
        scores["acc_stderr"] = _mean_with_stderr([100.0 * (p == g) for p, g in zip(picked, gold)])[1]
    if "generate" in task.scoring:
        texts = backend.answers([[{"role": "user", "content": prompt}] for prompt in prompts], task.max_new_tokens,
                                f"{task.name}: answers")
        picked = [_label_in(text, labels) for text in texts]
        result = classification_scores(gold, picked, labels)
        scores.update({"gen_acc": 100.0 * result["accuracy"], "gen_macro_f1": 100.0 * result["macro_f1"],
                       "gen_confusion": result["confusion"],
                       "extraction_failure_rate": 100.0 * picked.count(None) / len(items)})
        scores["gen_acc_stderr"] = _mean_with_stderr([100.0 * (p == g) for p, g in zip(picked, gold)])[1]
    return scores


def sentence_text(tokens: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The sentence as text and each token's character span: characters (Chinese CoNLL) are joined
    as they are, words with spaces."""
    joiner = "" if all(len(token) == 1 for token in tokens) else " "
    spans, at = [], 0
    for token in tokens:
        spans.append((at, at + len(token)))
        at += len(token) + len(joiner)
    return joiner.join(tokens), spans


def listed_entities(answer: str) -> list[tuple[str, str]]:
    """(type, entity) pairs an answer lists: JSON `{"entities": [{"type", "text"}]}` (or the bare list),
    else `TYPE：entity` lines."""
    import unicodedata

    try:
        parsed = json.loads(answer.strip())
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        parsed = parsed.get("entities")
    if isinstance(parsed, list):
        return [(str(entry["type"]).strip(), str(entry["text"]).strip()) for entry in parsed
                if isinstance(entry, dict) and "type" in entry and "text" in entry]
    pairs = []
    for line in unicodedata.normalize("NFKC", answer).splitlines():
        kind, sep, entity = line.partition(":")
        if sep:
            pairs.append((kind.strip().lstrip("-*• ").strip(), entity.strip()))
    return pairs


def tags_from_answer(answer: str, tokens: Sequence[str], types: Sequence[str]) -> list[str]:
    """BIO tags for the entities an answer lists (`listed_entities`): each marks its first occurrence in
    the sentence not already taken, when it starts and ends on token boundaries; anything else is dropped."""
    text, spans = sentence_text(tokens)
    starts = {start: index for index, (start, _) in enumerate(spans)}
    ends = {end: index for index, (_, end) in enumerate(spans)}
    tags = ["O"] * len(tokens)
    for kind, entity in listed_entities(answer):
        if kind not in types or not entity:
            continue
        at = text.find(entity)
        while at != -1:
            first, last = starts.get(at), ends.get(at + len(entity))
            if first is not None and last is not None and all(tag == "O" for tag in tags[first: last + 1]):
                tags[first: last + 1] = [f"B-{kind}"] + [f"I-{kind}"] * (last - first)
                break
            at = text.find(entity, at + 1)
    return tags


def score_extraction(task: TaskConfig, backend, items: list[TaggedSentence]) -> dict[str, Any]:
    from lmsmith.eval.labels import entity_scores, span_counts
    from lmsmith.eval.stats import bootstrap_stderr_of_sums

    types = sorted({tag[2:] for item in items for tag in item.tags if tag != "O"})
    if not types:
        raise UserError(f"{task.dataset}: no entity tags (B-TYPE) in the sentences")
    prompts = [task.template.format(text=sentence_text(item.tokens)[0], types="、".join(types)) for item in items]
    texts = backend.answers([[{"role": "user", "content": prompt}] for prompt in prompts], task.max_new_tokens,
                            f"{task.name}: answers")
    gold = [list(item.tags) for item in items]
    predicted = [tags_from_answer(text, item.tokens, types) for text, item in zip(texts, items)]
    result = entity_scores(gold, predicted)
    f1_stderr = bootstrap_stderr_of_sums(span_counts(gold, predicted), lambda sums: 100.0 * (
        2 * sums[0] / (sums[1] + sums[2]) if sums[1] + sums[2] else 0.0))
    return {"items": len(items), "entity_precision": 100.0 * result["precision"],
            "entity_recall": 100.0 * result["recall"], "entity_f1": 100.0 * result["f1"],
            "entity_f1_stderr": f1_stderr, "per_type": result["per_type"]}


def score_perplexity(task: TaskConfig, backend, documents: list[str]) -> dict[str, Any]:
    return {"items": len(documents), **backend.perplexity(documents, f"{task.name}: perplexity")}


def evaluate_task(task: TaskConfig, backend, shared: dict[str, Any] | None = None) -> dict[str, Any]:
    """Scores of one task on one model (`LocalModel` or `RemoteModel`). `shared` keeps what does not depend
    on the model (a kb's groundings, a retrieval task's scores) for the next model of one comparison."""
    shared = {} if shared is None else shared
    shots, items = split_shots(task, read_items(task))
    if task.type == "multiple_choice":
        return score_multiple_choice(task, backend, items, shots)
    if task.type in ("generate", "numeric"):
        scorer = score_generation if task.type == "generate" else score_numeric
        return scorer(task, backend, items, shared)
    if task.type == "retrieval":
        key = f"retrieval:{task.name}"
        if key not in shared:
            shared[key] = score_retrieval(task, backend, items)
        return dict(shared[key])
    scorer = {"classification": score_classification, "extraction": score_extraction,
              "perplexity": score_perplexity}[task.type]
    return scorer(task, backend, items)


def expand_tasks(names: Sequence[str | Path], folder: Path, seed: int = 0,
                 train_companies: int | None = 60, years: int = 5, ops: list[dict] | None = None) -> list[Path]:
    """Task files for `names`: a YAML path as it is, `finance-suite` written into `folder/finance-suite`
    (companies held out of the embedded dataset `seed`/`train_companies`/`years`; its texts rewritten by
    the cleaning operators `ops`, the data stage's defaults unless given)."""
    from lmsmith.data.steps import DEFAULT_OPS, rewriter
    from lmsmith.datasets.finance_suite import SUITE_NAME, write_suite

    paths: list[Path] = []
    for name in names:
        if str(name) == SUITE_NAME:
            rewrite = rewriter([dict(spec) for spec in (DEFAULT_OPS if ops is None else ops)], "instructions")
            paths += write_suite(folder / SUITE_NAME, seed=seed, train_companies=train_companies, years=years,
                                 rewrite=rewrite)
        else:
            paths.append(Path(name))
    return paths


def _first_generation_item(tasks: Sequence[TaskConfig]) -> tuple[list[dict] | None, int]:
    """The conversation and length cap of the first generation task's first item (the 'report' timed)."""
    for task in tasks:
        if task.type == "generate":
            item = read_items(task)[0]
            return list(item.messages), task.max_new_tokens
    return None, 0


def speed_conversations(tasks: Sequence[TaskConfig], count: int) -> list[list[dict]]:
    """Prompts for timing: the generation tasks' first items, else a fixed question."""
    conversations: list[list[dict]] = []
    for task in tasks:
        if task.type in ("generate", "numeric"):
            conversations += [list(item.messages) for item in read_items(task)[:count]]
    return (conversations or [[{"role": "user", "content": "请简要分析一家上市公司的年度财务表现。"}]] * count)[:count]


def evaluate_models(entries: Sequence[Any], task_paths: Sequence[Path], out: Path, batch_size: int = 16,
                    speed: Any = None, tokenizer_path: Path | None = None, title: str = "lmsmith eval",
                    write: bool = True) -> dict[str, Any]:
    """Every task on every model (`compare.ModelEntry`), their facts and speed; writes the comparison into
    `out` (unless `write` is False: the caller adds to it first).

    `tokenizer_path` prompts every local model through one tokenizer (a run's base through the tuned
    model's chat template); by default each model's own.
    """
    from lmsmith.eval.compare import measure_endpoint_speed, measure_local_speed, parameter_count, size_on_disk
    from lmsmith.eval.compare import write_outputs
    from lmsmith.generation import load_causal_lm, load_tokenizer

    tasks = [load_task(path) for path in task_paths]
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise UserError(f"--task: two tasks share a name ({', '.join(names)})")
    results: dict[str, Any] = {"models": {}, "tasks": {}}
    for task in tasks:
        shots, items = split_shots(task, read_items(task))
        results["tasks"][task.name] = {"type": task.type, "items": len(items), "dataset": str(task.dataset),
                                       "scores": {}}
    report, report_tokens = _first_generation_item(tasks)
    timing_prompts = speed_conversations(tasks, speed.requests) if speed is not None else []
    shared: dict[str, Any] = {}
    for entry in entries:
        facts: dict[str, Any] = {"describe": entry.describe, "trainable_params": entry.trainable_params}
        if entry.path is None:
            from lmsmith.eval.endpoint import EndpointModel

            endpoint = EndpointModel.from_spec(entry.describe)
            backend, model = RemoteModel(endpoint), None
            facts |= {"size_bytes": None, "params": None}
        else:
            model = load_causal_lm(entry.path)
            tokenizer = load_tokenizer(tokenizer_path or entry.path)
            backend = LocalModel(model, tokenizer, batch_size)
            facts |= {"path": str(entry.path), "size_bytes": size_on_disk(entry.path),
                      "params": parameter_count(entry.path)}
        for task in tasks:
            console.print(f"[bold]{task.name}[/] on {entry.label}")
            results["tasks"][task.name]["scores"][entry.label] = evaluate_task(task, backend, shared)
        if speed is not None:
            console.print(f"timing {entry.label}")
            facts["speed"] = (measure_local_speed(model, backend.tokenizer, timing_prompts, report, report_tokens, speed)
                              if model is not None else
                              measure_endpoint_speed(backend.endpoint, timing_prompts, report, report_tokens, speed))
        results["models"][entry.label] = facts
        del backend, model
        gc.collect()
    if not write:
        return results
    table = write_outputs(results, out.expanduser(), title)
    console.print(table.to_markdown(), markup=False)
    return results


def adapter_spec(spec: str) -> tuple[Path, Path | None] | None:
    """(adapter folder, base folder or None: the adapter's own base) when `spec` names a peft adapter, as
    ADAPTER or BASE+ADAPTER; None otherwise."""
    if Path(spec).expanduser().exists():
        base, adapter = None, Path(spec).expanduser()
    elif "+" in spec:
        base_text, _, adapter_text = spec.rpartition("+")
        base, adapter = Path(base_text).expanduser(), Path(adapter_text).expanduser()
        if not base.is_dir():
            raise UserError(f"--model {spec}: {base} is not a model folder")
    else:
        return None
    if not (adapter / "adapter_config.json").is_file():
        if base is not None:
            raise UserError(f"--model {spec}: {adapter} is not a peft adapter folder (no adapter_config.json)")
        return None
    return adapter, base


def adapter_entry(spec: str, adapter: Path, base: Path | None, folder: Path):
    """A model entry for base + adapter: the adapter merged into its base (`lmsmith.train.export`) in
    `folder`; its trainable parameters are the adapter's."""
    from safetensors import safe_open

    from lmsmith.eval.compare import ModelEntry
    from lmsmith.train.export import merge_adapter

    merged = merge_adapter(adapter, folder, base)
    trainable = None
    weights = adapter / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as handle:
            trainable = sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return ModelEntry(spec, f"{base or 'its base'} + adapter {adapter}", merged, trainable)


def run_suite(config: SuiteConfig) -> dict[str, Any]:
    """`lmsmith eval`: every task on every model; the comparison into `config.out`."""
    from lmsmith.eval.compare import ModelEntry, SpeedConfig

    out = config.out.expanduser()
    entries = []
    for index, spec in enumerate(config.model):
        remote = spec.startswith(("http://", "https://"))
        adapter = None if remote else adapter_spec(spec)
        if adapter is not None:
            entries.append(adapter_entry(spec, adapter[0], adapter[1], out / "merged" / f"model-{index}"))
        else:
            entries.append(ModelEntry(spec, spec, None if remote else resolve_model_spec(spec)))
    speed = SpeedConfig(requests=config.speed_requests) if config.speed_requests else None
    return evaluate_models(entries, expand_tasks(config.task, out / "tasks"), out, config.batch_size, speed)
