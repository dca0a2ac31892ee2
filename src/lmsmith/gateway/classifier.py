"""The moderation classifier: a small model trained by lmsmith's own pipeline to answer 合规 or 违规.

`recipes/moderation-classifier.yaml` trains it (data: `embedded:moderation`, or your own labelled
conversations in the same shape; tokenizer, pretrain and sft stages as for any model). Its answer is
read as a probability: the log-likelihoods of the two label words after the prompt
(`lmsmith.eval.likelihood.continuation_logprobs`), softmaxed against each other.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from lmsmith.datasets.moderation import ALLOWED, INSTRUCTION, VIOLATING


class ModerationClassifier:
    def __init__(self, folder: str | Path, threshold: float = 0.5):
        from lmsmith.generation import load_causal_lm, load_tokenizer
        from lmsmith.models import resolve_model_dir

        path = resolve_model_dir(folder)
        self.model, self.tokenizer = load_causal_lm(path), load_tokenizer(path)
        self.threshold = threshold

    def probabilities(self, texts: Sequence[str]) -> list[float]:
        """P(违规) of each text."""
        from lmsmith.eval.likelihood import continuation_logprobs

        contexts = [self.tokenizer.apply_chat_template(
            [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": text}],
            tokenize=False, add_generation_prompt=True) for text in texts]
        pairs = [(context, label) for context in contexts for label in (VIOLATING, ALLOWED)]
        scores = continuation_logprobs(self.model, self.tokenizer, pairs)
        out = []
        for index in range(len(texts)):
            violating, allowed = scores[2 * index], scores[2 * index + 1]
            out.append(1.0 / (1.0 + math.exp(allowed - violating)))
        return out

    def flags(self, text: str) -> bool:
        return self.probabilities([text])[0] >= self.threshold
