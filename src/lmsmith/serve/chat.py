"""`lmsmith chat`: a terminal conversation with a run's model, streamed as it is generated.

rich draws the prompts and notices; the model runs in-process on the same engine as `lmsmith serve`
(`lmsmith.serve.engine`), so what you see here is what the API answers.
"""

from __future__ import annotations

from pathlib import Path

from lmsmith.console import console
from lmsmith.models import resolve_model
from lmsmith.serve.engine import Engine, EngineError
from lmsmith.serve.sampling import SamplingParams

RESET_COMMAND = "/reset"
EXIT_COMMANDS = ("/exit", "/quit")
HELP = f"{RESET_COMMAND} clears the history, {EXIT_COMMANDS[0]} (or Ctrl-D) quits, Ctrl-C stops an answer."


def chat_loop(path: str | Path, max_new_tokens: int = 256, temperature: float = 0.0) -> None:
    """Read a line, answer it with the whole conversation as context, repeat until /exit or end of input."""
    resolved = resolve_model(path)
    with console.status(f"loading {resolved.path}"):
        engine = Engine.load(resolved.path)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature)
    console.print(f"[bold]{resolved.name}[/] ({resolved.path})", soft_wrap=True)
    console.print(f"[dim]{HELP}[/]")
    history: list[dict[str, str]] = []
    try:
        while True:
            try:
                line = console.input("[bold green]you[/] > ").strip()
            except (EOFError, KeyboardInterrupt):
                console.print()
                return
            if not line:
                continue
            if line in EXIT_COMMANDS:
                return
            if line == RESET_COMMAND:
                history.clear()
                console.print("[dim]history cleared[/]")
                continue
            if line.startswith("/"):
                console.print(f"[yellow]unknown command {line.split()[0]}[/]; {HELP}", soft_wrap=True)
                continue
            history.append({"role": "user", "content": line})
            answer = _answer(engine, history, params)
            if answer is None:
                history.pop()  # an interrupted or failed turn is forgotten, not half-remembered
            else:
                history.append({"role": "assistant", "content": answer})
    finally:
        engine.close()


def _answer(engine: Engine, history: list[dict[str, str]], params: SamplingParams) -> str | None:
    """Stream one answer to the terminal; None when it was interrupted or failed."""
    try:
        prompt_ids = engine.encode_chat(history)
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        return None
    if engine.max_context is not None and len(prompt_ids) >= engine.max_context:
        console.print(f"[yellow]the conversation no longer fits the model's context; {RESET_COMMAND} to start over[/]")
        return None
    console.print("[bold blue]assistant[/] > ", end="")
    parts: list[str] = []
    stream = engine.stream_sync(prompt_ids, params)
    try:
        for chunk in stream:
            if chunk.text:
                parts.append(chunk.text)
                # console.out writes the text as it is: no markup, wrapping or highlighting of model output.
                console.out(chunk.text, end="", highlight=False)
                console.file.flush()
    except KeyboardInterrupt:
        stream.close()
        console.print("\n[dim](answer stopped)[/]")
        return None
    except EngineError as exc:
        console.print(f"\n[red]{exc}[/]")
        return None
    console.print()
    return "".join(parts)
