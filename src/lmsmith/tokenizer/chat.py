"""The special tokens and the ChatML chat template every lmsmith tokenizer carries.

The template wraps each assistant turn's content and its `<|im_end|>` in `{% generation %}` markers, so
transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)` can tell which tokens the
answer-only SFT loss supervises.
"""

from __future__ import annotations

from importlib import resources

from lmsmith.errors import UserError

END_OF_TEXT = "<|endoftext|>"  # separates documents in pretraining
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # ends a chat turn: the eos of a chat model
PAD = "<|pad|>"  # distinct from every eos, so masking padding never hides a real end of turn
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, PAD)


def chatml_template() -> str:
    return resources.files("lmsmith.tokenizer").joinpath("chatml.jinja").read_text(encoding="utf-8")


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and "{% generation" in template.replace("{%-", "{%")


def ensure_chat_template(tokenizer, source: str) -> None:
    """Give `tokenizer` a template with generation markers, or explain why it cannot have one.

    A tokenizer from elsewhere may lack a template, or have one without the markers; ChatML fits it
    only when its vocabulary already holds the ChatML tokens (adding tokens would need new embeddings).
    """
    if has_generation_markers(getattr(tokenizer, "chat_template", None)):
        return
    vocab = tokenizer.get_vocab()
    if IM_START in vocab and IM_END in vocab:
        tokenizer.chat_template = chatml_template()
        return
    raise UserError(
        f"{source}: the tokenizer's chat template has no {{% generation %}} markers and its vocabulary "
        f"lacks {IM_START}/{IM_END}, so assistant tokens cannot be found for answer-only loss"
    )
