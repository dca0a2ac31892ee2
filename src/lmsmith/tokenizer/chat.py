"""The special tokens and the ChatML chat template every lmsmith tokenizer carries.

The template wraps each assistant turn's content and its `<|im_end|>` in `{% generation %}` markers, so
transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)` can tell which tokens the
answer-only SFT loss supervises.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

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


PLAIN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- 'Assistant: ' -}}{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['role'] | capitalize + ': ' + message['content'] + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)


def ensure_chat_template(tokenizer, source: str, choice: str | Path = "auto") -> str:
    """Give `tokenizer` the chat template `choice` asks for and say which one it got.

    auto keeps the tokenizer's own template (with or without `{% generation %}` markers: answer-only
    labels find the assistant's tokens either way); a tokenizer without one gets ChatML when its
    vocabulary holds the ChatML tokens, since adding tokens would need new embedding rows. chatml and
    plain force those templates; a path reads a Jinja file.
    """
    if isinstance(choice, Path) or (isinstance(choice, str) and choice not in ("auto", "chatml", "plain")):
        path = Path(choice)
        try:
            tokenizer.chat_template = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"{source}: chat template {path}: {exc.strerror}") from None
        return str(path)
    vocab = tokenizer.get_vocab()
    has_chatml = IM_START in vocab and IM_END in vocab
    if choice == "auto" and getattr(tokenizer, "chat_template", None):
        return "own"
    if choice == "plain":
        if tokenizer.eos_token is None:
            raise UserError(f"{source}: chat_template plain ends each answer with the eos token, and this "
                            "tokenizer has none")
        tokenizer.chat_template = PLAIN_TEMPLATE
        return "plain"
    if has_chatml:
        tokenizer.chat_template = chatml_template()
        return "chatml"
    if choice == "chatml":
        raise UserError(f"{source}: chat_template chatml needs {IM_START} and {IM_END} in the vocabulary, "
                        "which this tokenizer lacks; use chat_template: plain or a .jinja file")
    raise UserError(
        f"{source}: the tokenizer has no chat template and its vocabulary lacks {IM_START}/{IM_END}; set "
        "model.chat_template: plain (turns ended by its eos token) or the path of a .jinja template"
    )
