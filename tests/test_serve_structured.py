"""Structured output and tools on `lmsmith serve`: response_format, tools and tool_choice enforced by a
grammar in the engine, checked on a random tiny model (only the grammar can make its answers valid), and
through the clients users bring: the openai SDK and LangChain."""

from __future__ import annotations

import copy
import json

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from lmsmith.serve.api import create_app, running_server
from lmsmith.serve.client import LocalClient
from lmsmith.serve.structured import ToolCallReader, plan_output, split_tool_calls

from conftest import build_tiny_model

REPORT = {
    "type": "object",
    "properties": {
        "company": {"type": "string", "maxLength": 8},
        "year": {"type": "integer", "minimum": 2015, "maximum": 2025},
        "unit": {"enum": ["亿元", "万元", "USD"]},
        "profitable": {"type": "boolean"},
        "segments": {"type": "array", "maxItems": 3, "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 6}, "share": {"type": "number"}},
            "required": ["name", "share"], "additionalProperties": False}},
    },
    "required": ["company", "year", "unit", "profitable", "segments"],
    "additionalProperties": False,
}
RATE_TOOL = {"type": "function", "function": {
    "name": "get_fx_rate", "description": "Exchange rate of a currency against CNY",
    "parameters": {"type": "object", "properties": {
        "currency": {"enum": ["USD", "HKD", "EUR"]}, "days": {"type": "integer", "minimum": 1, "maximum": 30}},
        "required": ["currency", "days"], "additionalProperties": False}}}
CALC_TOOL = {"type": "function", "function": {
    "name": "calculate", "description": "Evaluate an arithmetic expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 10}},
                   "required": ["expression"], "additionalProperties": False}}}
TOOLS = [RATE_TOOL, CALC_TOOL]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "美元兑人民币汇率是多少?"}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_tokenizer):
    from lmsmith.serve.engine import Engine

    # a long context: the tools section of the prompt is long in a 600-token vocabulary
    path = tmp_path_factory.mktemp("structured_model")
    build_tiny_model(tiny_tokenizer, max_positions=4096).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    engine = Engine.load(path, device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(LocalClient("tiny", engine), default_max_tokens=64)
    with running_server(app) as url:
        yield url


def chat(server: str, **body) -> httpx.Response:
    return httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny", "messages": ASK, **body}, timeout=120)


def answers(server: str, seeds=range(3), **body) -> list[dict]:
    out = []
    for seed in seeds:
        response = chat(server, seed=seed, temperature=1.0, **body)
        assert response.status_code == 200, response.text
        out.append(response.json()["choices"][0])
    return out


def test_json_object_answers_parse_as_objects(server):
    for choice in answers(server, max_tokens=3000, response_format={"type": "json_object"}):
        assert choice["finish_reason"] == "stop"
        assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_json_schema_answers_validate(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "report", "schema": REPORT, "strict": True}}
    for choice in answers(server, seeds=range(4), max_tokens=400, response_format=fmt):
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), REPORT)


def test_without_a_grammar_the_random_model_writes_no_json(server):
    """The control: the same requests without response_format give text that is not the schema's JSON."""
    for choice in answers(server, max_tokens=60):
        with pytest.raises((ValueError, jsonschema.ValidationError)):
            jsonschema.validate(json.loads(choice["message"]["content"]), REPORT)


def check_calls(choice: dict, names=None) -> list[dict]:
    assert choice["finish_reason"] == "tool_calls", choice
    calls = choice["message"]["tool_calls"]
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        name = call["function"]["name"]
        assert name in (names or SCHEMAS)
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])
    return calls


def test_tool_choice_required_makes_valid_calls(server):
    for choice in answers(server, max_tokens=300, tools=TOOLS, tool_choice="required"):
        check_calls(choice)
        assert choice["message"]["content"] is None


def test_named_tool_choice_calls_that_function_once(server):
    named = {"type": "function", "function": {"name": "calculate"}}
    for choice in answers(server, max_tokens=300, tools=TOOLS, tool_choice=named):
        assert len(check_calls(choice, names=["calculate"])) == 1


def test_parallel_tool_calls_false_makes_one_call(server):
    for choice in answers(server, seeds=range(4), max_tokens=300, tools=TOOLS, tool_choice="required",
                          parallel_tool_calls=False):
        assert len(check_calls(choice)) == 1


def test_tool_choice_none_never_calls(server):
    for choice in answers(server, max_tokens=80, tools=TOOLS, tool_choice="none"):
        assert "tool_calls" not in choice["message"]
        assert "<tool_call>" not in (choice["message"]["content"] or "")


def test_tool_choice_auto_answers_or_calls(server):
    for choice in answers(server, seeds=range(4), max_tokens=300, tools=TOOLS):
        if choice["finish_reason"] == "tool_calls":
            check_calls(choice)
        else:
            assert "<tool_call>" not in choice["message"]["content"]


def test_auto_with_a_schema_answers_that_json_or_calls(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "report", "schema": REPORT}}
    for choice in answers(server, seeds=range(3), max_tokens=400, tools=TOOLS, response_format=fmt):
        if choice["finish_reason"] == "tool_calls":
            check_calls(choice)
        else:
            jsonschema.validate(json.loads(choice["message"]["content"]), REPORT)


def test_streamed_tool_calls_match_the_whole_answer(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    body = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=300)
    whole = client.chat.completions.create(**body)
    calls: dict[int, dict] = {}
    reasons = []
    for event in client.chat.completions.create(stream=True, **body):
        for choice in event.choices:
            reasons.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
    assert reasons[-1] == "tool_calls" and whole.choices[0].finish_reason == "tool_calls"
    expected = [(call.function.name, json.loads(call.function.arguments)) for call in whole.choices[0].message.tool_calls]
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] == expected
    assert all(calls[i]["id"].startswith("call_") for i in calls)


def test_a_tool_result_turn_is_accepted(server):
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_fx_rate", "arguments": json.dumps({"currency": "USD", "days": 1})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "7.12"},
    ]
    response = httpx.post(f"{server}/v1/chat/completions", json={
        "model": "tiny", "messages": messages, "tools": TOOLS, "max_tokens": 5}, timeout=60)
    assert response.status_code == 200, response.text


def test_the_tool_turns_render_through_the_template(engine):
    text = engine.tokenizer.apply_chat_template(ASK + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_fx_rate", "arguments": {"currency": "USD", "days": 1}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "7.12"}], tools=TOOLS, tokenize=False)
    assert '"name": "get_fx_rate"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "get_fx_rate", "arguments": {"currency": "USD", "days": 1}}\n</tool_call>' in text
    assert "<|im_start|>tool\n7.12<|im_end|>" in text


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(?<=a)b"}}}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"tools": [RATE_TOOL, RATE_TOOL]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"functions": [{"name": "f"}]}, None),
])
def test_structure_it_cannot_enforce_is_a_400_naming_the_field(server, body, param):
    response = chat(server, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    else:
        assert "functions" in error["message"]


@pytest.mark.parametrize("message, needle", [
    ({"role": "tool", "content": "7.1"}, "tool_call_id"),
    ({"role": "user", "content": "x", "tool_call_id": "c"}, "tool_call_id"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}, "arguments"),
])
def test_malformed_tool_turns_are_refused(server, message, needle):
    response = httpx.post(f"{server}/v1/chat/completions", json={
        "model": "tiny", "messages": ASK + [message]}, timeout=30)
    assert response.status_code == 400 and needle in response.text


def test_text_completions_refuse_structure_by_name(server):
    response = httpx.post(f"{server}/v1/completions", json={
        "model": "tiny", "prompt": "x", "response_format": {"type": "json_object"}}, timeout=30)
    assert response.status_code == 400 and "response_format" in response.json()["error"]["message"]


def test_a_template_that_cannot_show_tools_refuses_them(tmp_path, tiny_tokenizer):
    from lmsmith.serve.engine import Engine
    from lmsmith.tokenizer.chat import PLAIN_TEMPLATE

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = PLAIN_TEMPLATE
    engine = Engine(build_tiny_model(tokenizer), tokenizer)
    try:
        app = create_app(LocalClient("plain", engine), default_max_tokens=8)
        with running_server(app) as url:
            response = httpx.post(f"{url}/v1/chat/completions", json={
                "model": "plain", "messages": ASK, "tools": TOOLS}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == "tools"
    finally:
        engine.close()


# ----- the clients users bring -----


class FxQuery(BaseModel):
    """Look up an exchange rate."""

    currency: str = Field(pattern="^(USD|HKD|EUR)$")
    days: int = Field(ge=1, le=30)


class Filing(BaseModel):
    company: str = Field(max_length=8)
    year: int = Field(ge=2015, le=2025)
    profitable: bool


def langchain_model(server: str, **kwargs):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model="tiny", temperature=0, max_tokens=300,
                      **kwargs)


def test_langchain_bind_tools_returns_a_tool_call(server):
    llm = langchain_model(server).bind_tools([FxQuery], tool_choice="FxQuery")
    message = llm.invoke("美元汇率?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "FxQuery"
    FxQuery(**message.tool_calls[0]["args"])


def test_langchain_bind_tools_required(server):
    message = langchain_model(server).bind_tools([FxQuery], tool_choice="any").invoke("美元汇率?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "FxQuery"


@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_langchain_with_structured_output_returns_the_pydantic_object(server, method):
    llm = langchain_model(server, max_retries=0)
    if method == "json_mode":  # json_mode gives any object: the schema is only in the prompt, so ask for a dict
        result = llm.with_structured_output(method=method).invoke("以JSON回答")
        assert isinstance(result, dict)
        return
    result = llm.with_structured_output(Filing, method=method).invoke("贵州茅台2023年")
    assert isinstance(result, Filing)


def test_langchain_tool_result_turn_is_accepted(server):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    history = [HumanMessage("美元汇率?"),
               AIMessage("", tool_calls=[{"id": "call_1", "name": "FxQuery", "args": {"currency": "USD", "days": 1}}]),
               ToolMessage("7.12", tool_call_id="call_1")]
    reply = langchain_model(server).bind_tools([FxQuery]).invoke(history)
    assert isinstance(reply, AIMessage)


def test_openai_parse_returns_the_pydantic_object(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    completions = client.beta.chat.completions if hasattr(client, "beta") else client.chat.completions
    result = completions.parse(model="tiny", messages=ASK, response_format=Filing, temperature=0, max_tokens=300)
    assert isinstance(result.choices[0].message.parsed, Filing)


# ----- the pieces -----


def test_tool_call_reader_holds_back_a_possible_tag_and_splits_calls():
    reader = ToolCallReader()
    out = []
    for piece in ["好的 <tool", "_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_", "call>\n<tool_call>\n",
                  "{\"name\": \"g\", \"arguments\": {}}\n</tool_call>"]:
        out += reader.feed(piece)
    out += reader.feed("", final=True)
    assert out[0] == "好的 "
    assert [(call.name, json.loads(call.arguments)) for call in out[1:]] == [("f", {"a": 1}), ("g", {})]


def test_an_answer_cut_inside_a_call_keeps_its_text():
    content, calls = split_tool_calls('<tool_call>\n{"name": "f", "argu')
    assert calls == [] and content == '<tool_call>\n{"name": "f", "argu'


def test_plans_without_structure_have_no_grammar():
    assert plan_output(None, None, None, None).grammar is None
    assert plan_output({"type": "text"}, None, "none", None).grammar is None
