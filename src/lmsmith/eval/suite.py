"""`lmsmith eval --task TASK.yaml --model MODEL ...`: every task against every local model, one table.

Models are named as `lmsmith serve` names them, plus one form for any stage output of a run:
- an HF model folder, or a compress-stage int8 folder;
- a run folder: its tuned (sft) model;
- `run:RUN#STAGE` or `run:RUN#STAGE/OUTPUT` (output `model` by default): `run:runs/demo#pretrain`;
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
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field

from lmsmith.console import console
from lmsmith.errors import UserError
from lmsmith.eval.tasks import (
    ChoiceQuestion,
    LabeledText,
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

    task: list[Path] = Field(..., description="Task YAML file.")
    model: list[str] = Field(..., description="Model: an HF folder, a run folder (its tuned model), "
                             "run:RUN#STAGE[/OUTPUT], or an OpenAI-compatible URL http://HOST/v1[#MODEL].")
    out: Path = Field(Path("eval-results"), description="Folder for results.json and table.md.")
    batch_size: int = Field(16, ge=1, description="Sequences per forward pass.")


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

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def loglikelihoods(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        from lmsmith.eval.likelihood import continuation_logprobs

        return continuation_logprobs(self.model, self.tokenizer, pairs, self.batch_size)

    def answers(self, conversations: Sequence[Sequence[dict]], max_new_tokens: int, progress: str) -> list[str]:
        from lmsmith.generation import generate_chat

        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"{progress}: answers are asked through the chat template, and this tokenizer has none")
        return generate_chat(self.model, self.tokenizer, [list(c) for c in conversations],
                             max_new_tokens=max_new_tokens, batch_size=self.batch_size, progress=progress).texts

    def perplexity(self, documents: Sequence[str], progress: str) -> dict[str, Any]:
        from lmsmith.eval.metrics import perplexity

        result = perplexity(self.model, self.tokenizer, documents, batch_size=self.batch_size, progress=progress)
        return {"perplexity": result.perplexity, "tokens": result.tokens}


class RemoteModel:
    """An OpenAI-compatible server (`lmsmith.eval.endpoint`)."""

    def __init__(self, endpoint):
        self.endpoint = endpoint

    def loglikelihoods(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        return self.endpoint.continuation_logprobs(pairs)

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

        pairs = [(prompt, f" {letter}") for prompt, (_, options, _) in zip(prompts, asked)
                 for letter in letters_for(options)]
        flat = backend.loglikelihoods(pairs)
        right: dict[int, list[bool]] = {}
        for (index, _, gold), best in zip(asked, best_per_group(flat, [len(options) for _, options, _ in asked])):
            right.setdefault(index, []).append(best == gold)
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


def score_generation(task: TaskConfig, backend, items: list[Reference]) -> dict[str, Any]:
    from lmsmith.eval.metrics import bleu4, chrf, edit_rates, exact_match, rouge_l_scores
    from lmsmith.eval.stats import bootstrap_stderr

    answers = backend.answers([item.messages for item in items], task.max_new_tokens, f"{task.name}: answers")
    references = [item.reference for item in items]
    pairs = list(zip(answers, references))
    scores: dict[str, Any] = {"items": len(items)}
    for name, values in (("rougeL", rouge_l_scores(answers, references)), ("exact_match", exact_match(answers, references)),
                         ("edit_rate", edit_rates(answers, references))):
        scores[name], scores[f"{name}_stderr"] = _mean_with_stderr(values)
    for name, corpus_metric in (("bleu4", bleu4), ("chrf", chrf)):
        scores[name] = corpus_metric(answers, references)
        scores[f"{name}_stderr"] = bootstrap_stderr(pairs, lambda sample, m=corpus_metric: m(
            [a for a, _ in sample], [r for _, r in sample]), resamples=200)
    scores["samples"] = [{"id": item.id, "answer": answer, "reference": item.reference}
                         for item, answer in zip(items[:5], answers)]
    return scores


def score_numeric(task: TaskConfig, backend, items: list[Reference]) -> dict[str, Any]:
    from lmsmith.eval.metrics import extract_number, numeric_match

    truths = []
    for item in items:
        truth = item.value if item.value is not None else extract_number(item.reference)
        if truth is None:
            raise UserError(f"{task.dataset}: item {item.id} has no numeric truth (answer.value, or a number in "
                            "its reference)")
        truths.append(truth)
    texts = backend.answers([item.messages for item in items], task.max_new_tokens, f"{task.name}: answers")
    values = [100.0 * numeric_match(text, truth, task.rel_tol) for text, truth in zip(texts, truths)]
    scores: dict[str, Any] = {"items": len(items)}
    scores["numeric_acc"], scores["numeric_acc_stderr"] = _mean_with_stderr(values)
    scores["no_number_rate"] = 100.0 * sum(extract_number(text) is None for text in texts) / len(items)
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


def tags_from_answer(answer: str, tokens: Sequence[str], types: Sequence[str]) -> list[str]:
    """BIO tags for the `TYPE：entity` lines of an answer: each entity marks its first occurrence in the
    sentence not already taken, when it starts and ends on token boundaries; anything else is dropped."""
    import unicodedata

    text, spans = sentence_text(tokens)
    starts = {start: index for index, (start, _) in enumerate(spans)}
    ends = {end: index for index, (_, end) in enumerate(spans)}
    tags = ["O"] * len(tokens)
    for line in unicodedata.normalize("NFKC", answer).splitlines():
        kind, sep, entity = line.partition(":")
        kind, entity = kind.strip().lstrip("-*• ").strip(), entity.strip()
        if not sep or kind not in types or not entity:
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
    from lmsmith.eval.labels import entity_scores
    from lmsmith.eval.stats import bootstrap_stderr

    types = sorted({tag[2:] for item in items for tag in item.tags if tag != "O"})
    if not types:
        raise UserError(f"{task.dataset}: no entity tags (B-TYPE) in the sentences")
    prompts = [task.template.format(text=sentence_text(item.tokens)[0], types="、".join(types)) for item in items]
    texts = backend.answers([[{"role": "user", "content": prompt}] for prompt in prompts], task.max_new_tokens,
                            f"{task.name}: answers")
    gold = [list(item.tags) for item in items]
    predicted = [tags_from_answer(text, item.tokens, types) for text, item in zip(texts, items)]
    result = entity_scores(gold, predicted)
    pairs = list(zip(gold, predicted))
    f1_stderr = bootstrap_stderr(pairs, lambda sample: 100.0 * entity_scores([g for g, _ in sample],
                                                                             [p for _, p in sample])["f1"], resamples=200)
    return {"items": len(items), "entity_precision": 100.0 * result["precision"],
            "entity_recall": 100.0 * result["recall"], "entity_f1": 100.0 * result["f1"],
            "entity_f1_stderr": f1_stderr, "per_type": result["per_type"]}


def score_perplexity(task: TaskConfig, backend, documents: list[str]) -> dict[str, Any]:
    return {"items": len(documents), **backend.perplexity(documents, f"{task.name}: perplexity")}


def evaluate_task(task: TaskConfig, backend) -> dict[str, Any]:
    """Scores of one task on one model (`LocalModel` or `RemoteModel`)."""
    shots, items = split_shots(task, read_items(task))
    if task.type == "multiple_choice":
        return score_multiple_choice(task, backend, items, shots)
    scorer = {"generate": score_generation, "numeric": score_numeric, "classification": score_classification,
              "extraction": score_extraction, "perplexity": score_perplexity}[task.type]
    return scorer(task, backend, items)


SHOWN = ("acc", "gen_acc", "macro_f1", "gen_macro_f1", "extraction_failure_rate", "numeric_acc", "entity_f1",
         "bleu4", "rougeL", "chrf", "exact_match", "edit_rate", "perplexity")


def _table(results: dict[str, Any]) -> str:
    columns = [(task, metric) for task, by_model in results["tasks"].items()
               for metric in SHOWN if any(metric in scores for scores in by_model.values())]
    header = "| model | " + " | ".join(f"{task} {metric}" for task, metric in columns) + " |"
    lines = [header, "| --- |" + " ---: |" * len(columns)]
    for name in results["models"]:
        cells = []
        for task, metric in columns:
            scores = results["tasks"][task].get(name, {})
            value, error = scores.get(metric), scores.get(f"{metric}_stderr")
            cells.append("–" if value is None else f"{value:.2f}" + (f" ± {error:.2f}" if error is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_suite(config: SuiteConfig) -> dict[str, Any]:
    """Evaluate every task on every model; write results.json and table.md into `config.out`."""
    from lmsmith.generation import load_causal_lm, load_tokenizer

    tasks = [load_task(path) for path in config.task]
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise UserError(f"--task: two tasks share a name ({', '.join(names)})")
    remote = {spec for spec in config.model if spec.startswith(("http://", "https://"))}
    folders = {spec: resolve_model_spec(spec) for spec in config.model if spec not in remote}
    results: dict[str, Any] = {"models": {spec: str(folders.get(spec, spec.partition("#")[0])) for spec in config.model},
                               "tasks": {task.name: {} for task in tasks}}
    for spec in config.model:
        if spec in remote:
            from lmsmith.eval.endpoint import EndpointModel

            backend, model = RemoteModel(EndpointModel.from_spec(spec)), None
        else:
            model = load_causal_lm(folders[spec])
            backend = LocalModel(model, load_tokenizer(folders[spec]), config.batch_size)
        for task in tasks:
            console.print(f"[bold]{task.name}[/] on {spec}")
            results["tasks"][task.name][spec] = evaluate_task(task, backend)
        del backend, model
        gc.collect()
    out = config.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    table = _table(results)
    (out / "table.md").write_text(table, encoding="utf-8")
    console.print(table, markup=False)
    return results
