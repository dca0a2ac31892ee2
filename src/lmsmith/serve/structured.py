"""Structured output and tool calls: what a chat request's `response_format`, `tools` and `tool_choice` ask
of the answer, written as one grammar, and the tool calls read back out of the answer.

The grammar is llguidance's (JSON schema, or Lark with `%json` blocks); the engine turns it into a token
mask at every step (`engine/grammar.py`), so the answer cannot leave it. Tool calls use the Hermes
format that Qwen2.5/Qwen3 and lmsmith's ChatML template share, one block per call:

    <tool_call>
    {"name": "get_rate", "arguments": {"currency": "USD"}}
    </tool_call>

JSON is written with `", "` and `": "` separators and no other whitespace, as chat templates' `tojson`
renders it, so a constrained answer looks like the examples the model was trained on.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructureError(ValueError):
    """The request asks for a structure that cannot be enforced; `param` names the field (a 400)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class OutputPlan:
    """What the answer must be: `grammar` for the engine (None: free text), and whether to read tool calls
    out of it (`tools`: the request offered tools the model may call)."""

    grammar: str | None
    tools: bool


def plan_output(response_format: dict[str, Any] | None, tools: list[dict[str, Any]] | None,
                tool_choice: str | dict[str, Any] | None, parallel_tool_calls: bool | None) -> OutputPlan:
    """The grammar for a chat request's output fields (already shape-checked by the protocol models).

    - `response_format` json_object: any JSON object; json_schema: that schema.
    - `tools` with `tool_choice` auto (the default with tools): the answer (text, or the response_format's
      JSON) or tool calls; required: one or more calls; a named function: one call of it; none: no call.
    - `parallel_tool_calls: false`: at most one call.
    """
    answer = _answer_json(response_format)
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    if not tools:
        if choice != "none":
            raise StructureError("tool_choice: needs tools to choose from", "tool_choice")
        if answer is None:
            return OutputPlan(None, tools=False)
        return OutputPlan(_checked(_json_grammar(answer), "response_format"), tools=False)
    functions = {tool["function"]["name"]: tool["function"] for tool in tools}
    if len(functions) != len(tools):
        raise StructureError("tools: two functions share a name", "tools")
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        if name not in functions:
            raise StructureError(f"tool_choice: no function named {name!r} in tools", "tool_choice")
        return OutputPlan(_checked(_lark_calls({name: functions[name]}, several=False), "tools"), tools=True)
    several = parallel_tool_calls is not False
    if choice == "required":
        return OutputPlan(_checked(_lark_calls(functions, several), "tools"), tools=True)
    if choice == "none":
        body = "start: answer\n" + _answer_rule(answer)
        return OutputPlan(_checked(_lark(body), "response_format" if answer is not None else "tools"), tools=False)
    if answer is not None:  # auto with a response_format: that JSON, or calls
        calls = "call (\"\\n\" call)*" if several else "call"
        return OutputPlan(_checked(_lark(f"start: answer | {calls}\n" + _answer_rule(answer) + _call_rule(functions)),
                                   "response_format"), tools=True)
    # auto: the model decides; text (never holding a half-made call), then calls if any, nothing after them
    body = ("start: answer | head call_body more_calls\n" + _answer_rule(None)
            + f"head[lazy]: /(?s:.*){_regex_literal(TOOL_OPEN)}/\n"
            + f"call_body: \"\\n\" {_call_json(functions)} \"\\n{TOOL_CLOSE}\"\n"
            + ("more_calls: (\"\\n\" call)*\n" if several else "more_calls: \"\"\n")
            + _call_rule(functions))
    return OutputPlan(_checked(_lark(body), "tools"), tools=True)


def _answer_json(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema the answer must follow, or None for free text."""
    if response_format is None or response_format["type"] == "text":
        return None
    if response_format["type"] == "json_object":
        return {"type": "object"}
    return response_format["json_schema"]["schema"]


def _styled(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {**JSON_STYLE, **schema.get("x-guidance", {})}}


def _answer_rule(answer: dict[str, Any] | None) -> str:
    if answer is not None:
        return f"answer: %json{json.dumps(_styled(answer), ensure_ascii=False)}\n"
    # free text that never opens a tool call
    return f"answer: ANSWER_TEXT\nANSWER_TEXT: /(?s:.*)/ & ~/(?s:.*){_regex_literal(TOOL_OPEN)}(?s:.*)/\n"


def _call_json(functions: dict[str, dict[str, Any]]) -> str:
    options = [{
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": function.get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    } for name, function in functions.items()]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return "%json" + json.dumps(_styled(schema), ensure_ascii=False)


def _call_rule(functions: dict[str, dict[str, Any]]) -> str:
    return f"call: \"{TOOL_OPEN}\\n\" {_call_json(functions)} \"\\n{TOOL_CLOSE}\"\n"


def _lark_calls(functions: dict[str, dict[str, Any]], several: bool) -> str:
    return _lark(("start: call (\"\\n\" call)*\n" if several else "start: call\n") + _call_rule(functions))


def _lark(body: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark("%llguidance {}\n" + body)


def _json_grammar(schema: dict[str, Any]) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(_styled(schema))


def _checked(grammar: str, param: str) -> str:
    """`grammar` when llguidance accepts it; a StructureError naming the request field otherwise."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        reason = error.strip().splitlines()[0]
        raise StructureError(f"{param}: this schema cannot be enforced: {reason}", param)
    return grammar


def _regex_literal(text: str) -> str:
    return "".join("\\" + char if char in r".^$*+?()[]{}|\/" else char for char in text)


# ----- reading tool calls back -----


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as OpenAI sends it

    def body(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _parse_call(block: str) -> ToolCall | None:
    try:
        call = json.loads(block)
        name, arguments = call["name"], call["arguments"]
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), name, json.dumps(arguments, ensure_ascii=False))


def split_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole answer: the text before the first call block, and every complete call.

    An answer cut short inside a call (finish_reason length) keeps the unfinished block as text."""
    pieces = ToolCallReader().feed(text, final=True)
    return ("".join(piece for piece in pieces if isinstance(piece, str)),
            [piece for piece in pieces if isinstance(piece, ToolCall)])


class ToolCallReader:
    """Streamed answer text in; content text and complete `ToolCall`s out, as soon as each is known.

    Text that could still be the start of `<tool_call>` is held back until it is decided. A call is passed
    on whole once its closing tag arrives (its arguments in one piece).
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._in_call = False

    def feed(self, text: str, final: bool = False) -> list[str | ToolCall]:
        self._buffer += text
        out: list[str | ToolCall] = []
        while True:
            if not self._in_call:
                start = self._buffer.find(TOOL_OPEN)
                if start < 0:
                    keep = 0 if final else _partial_suffix(self._buffer, TOOL_OPEN)
                    cut = len(self._buffer) - keep
                    if cut:
                        out.append(self._buffer[:cut])
                        self._buffer = self._buffer[cut:]
                    return out
                if start:
                    out.append(self._buffer[:start])
                self._buffer = self._buffer[start + len(TOOL_OPEN):]
                self._in_call = True
            end = self._buffer.find(TOOL_CLOSE)
            if end < 0:
                if final and self._buffer:  # cut short inside a call: what there is stays visible as text
                    out.append(TOOL_OPEN + self._buffer)
                    self._buffer = ""
                return out
            call = _parse_call(self._buffer[:end])
            rest = self._buffer[end + len(TOOL_CLOSE):]
            if call is None:  # never from a constrained answer; kept visible rather than lost
                out.append(TOOL_OPEN + self._buffer[:end + len(TOOL_CLOSE)])
            else:
                out.append(call)
                rest = rest.lstrip("\n")  # the separator between calls
            self._buffer, self._in_call = rest, False


def _partial_suffix(text: str, tag: str) -> int:
    """How many trailing characters of `text` could begin `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0
