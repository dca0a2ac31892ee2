"""`lmsmith chat` driven through stdin: it answers with the conversation as context, /reset forgets it,
/exit and end of input leave cleanly."""

from __future__ import annotations

import os
import subprocess
import unicodedata
import sys

import pytest
import torch

MAX_TOKENS = 24
ASSISTANT_PROMPT = "assistant > "
USER_PROMPT = "you > "


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def greedy_answer(hf_model, messages) -> str:
    model, tokenizer = hf_model
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(output[0, len(prompt):], skip_special_tokens=True)


def run_chat(model_dir, stdin: str) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "-m", "lmsmith.cli", "chat", str(model_dir), "--max-new-tokens", str(MAX_TOKENS)],
        input=stdin, capture_output=True, text=True, encoding="utf-8", env=env, timeout=120,
    )


def as_shown(text: str) -> str:
    return "".join(ch for ch in text if ch == "\n" or unicodedata.category(ch) != "Cc")


def answers_in(stdout: str) -> list[str]:
    """Each streamed answer: the text between the assistant prompt and the next user prompt."""
    pieces = stdout.split(ASSISTANT_PROMPT)[1:]
    return [piece.split(USER_PROMPT)[0].removesuffix("\n") for piece in pieces]


@pytest.mark.slow
def test_chat_keeps_history_resets_and_ends_at_end_of_input(tiny_model_dir, hf_model):
    first, second = "华信银行", "毛利率"
    result = run_chat(tiny_model_dir, f"{first}\n{second}\n/reset\n{second}\n")
    assert result.returncode == 0, result.stderr
    assert "history cleared" in result.stdout
    assert "Traceback" not in result.stderr

    expected_first = greedy_answer(hf_model, [{"role": "user", "content": first}])
    with_history = greedy_answer(hf_model, [
        {"role": "user", "content": first},
        {"role": "assistant", "content": expected_first},
        {"role": "user", "content": second},
    ])
    fresh = greedy_answer(hf_model, [{"role": "user", "content": second}])
    assert with_history != fresh  # otherwise the test could not tell history from no history
    # The terminal drops control characters that a random model may emit; compare what a user sees.
    assert [as_shown(answer) for answer in answers_in(result.stdout)] == [as_shown(expected_first), as_shown(with_history), as_shown(fresh)]


@pytest.mark.slow
def test_chat_exit_command_leaves_before_later_lines(tiny_model_dir):
    result = run_chat(tiny_model_dir, "/what\n/exit\n华信银行\n")
    assert result.returncode == 0, result.stderr
    assert "unknown command /what" in result.stdout
    assert ASSISTANT_PROMPT not in result.stdout  # the question after /exit was never answered


def test_chat_rejects_a_folder_that_is_not_a_model(tmp_path):
    from lmsmith.errors import UserError
    from lmsmith.serve.chat import chat_loop

    with pytest.raises(UserError, match="neither a run folder"):
        chat_loop(tmp_path, max_new_tokens=4, temperature=0.0)
