"""Tool calling without a model: validation, prompt rendering, forced-call schemas, reply parsing and
the streamed deltas (`shoal.llm.tools`)."""

from __future__ import annotations

import json

import pytest

from shoal.llm.protocol import ChatCompletionRequest, OpenAIError, from_validation_error
from shoal.llm.tools import (
    ToolCallStream,
    check_tool_choice,
    check_tools,
    forced_response_format,
    parse_reply,
    render_messages,
)
from pydantic import ValidationError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
TOOLS = check_tools([WEATHER, TIME])


def _error(**fields) -> OpenAIError:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    return from_validation_error(info.value)


def test_tool_choice_defaults_and_modes() -> None:
    assert check_tool_choice(None, []) == ("none", None)
    assert check_tool_choice(None, TOOLS) == ("auto", None)
    assert check_tool_choice("required", TOOLS) == ("required", None)
    assert check_tool_choice({"type": "function", "function": {"name": "get_time"}}, TOOLS) == ("named", "get_time")


def test_bad_tools_and_tool_choice_are_400s_naming_the_field() -> None:
    err = _error(tool_choice="auto")
    assert err.status == 400 and err.param == "tool_choice" and "only allowed when 'tools'" in err.message
    err = _error(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert err.param == "tool_choice" and "'nope'" in err.message and "get_weather" in err.message
    err = _error(tools=[{"type": "retrieval"}])
    assert err.param == "tools"
    err = _error(tools=[WEATHER, WEATHER])
    assert err.param == "tools" and "twice" in err.message
    err = _error(tools=[WEATHER], tool_choice="sometimes")
    assert err.param == "tool_choice"


def test_function_without_parameters_takes_an_open_object() -> None:
    (tool,) = check_tools([{"type": "function", "function": {"name": "ping"}}])
    assert tool["function"]["parameters"] == {"type": "object", "properties": {}}


def test_history_with_calls_is_accepted_and_kept() -> None:
    req = ChatCompletionRequest.model_validate({"model": "m", "tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 C, rain"},
    ]})
    assert req.messages[1]["tool_calls"][0]["id"] == "call_1" and req.messages[1]["content"] == ""
    assert req.messages[2] == {"role": "tool", "content": "4 C, rain", "tool_call_id": "call_1"}


def test_plain_template_gets_a_system_message_and_calls_written_back() -> None:
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": "4 C"},
    ]
    messages, extra = render_messages(history, TOOLS, "auto", "{{ message['content'] }}")
    assert extra == {}
    assert messages[0]["content"].startswith("Be brief.") and '"name": "get_time"' in messages[0]["content"]
    assert messages[2] == {"role": "assistant",
                           "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'}
    assert all("tool_calls" not in m for m in messages)
    # tool_choice "none": the tools are not offered at all
    messages, _ = render_messages(history, TOOLS, "none", "plain")
    assert "get_time" not in messages[0]["content"]


def test_template_that_speaks_tools_gets_them_natively() -> None:
    history = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]
    messages, extra = render_messages(history, TOOLS, "auto", "{% for tool in tools %}...{% endfor %}")
    assert extra == {"tools": TOOLS}
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert messages[0]["content"] == ""


def test_forced_schemas() -> None:
    named = forced_response_format(TOOLS, "named", "get_weather")
    assert named["json_schema"]["schema"] == WEATHER["function"]["parameters"]
    required = forced_response_format(TOOLS, "required", None)["json_schema"]["schema"]
    assert [o["properties"]["name"]["const"] for o in required["anyOf"]] == ["get_weather", "get_time"]
    assert forced_response_format(TOOLS, "auto", None) is None


def test_parse_auto_replies() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = parse_reply(text, TOOLS, "auto")
    assert content == "Let me check."
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    # two calls; a bare JSON reply (Llama 3.1's form, "parameters"); an unknown function is text
    two = text + '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
    assert [c["function"]["name"] for c in parse_reply(two, TOOLS, "auto")[1]] == ["get_weather", "get_time"]
    content, calls = parse_reply(' {"name": "get_time", "parameters": {"zone": "CET"}}', TOOLS, "auto")
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"zone": "CET"}
    unknown = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert parse_reply(unknown, TOOLS, "auto") == (unknown, [])
    assert parse_reply("It is sunny.", TOOLS, "auto") == ("It is sunny.", [])


def test_parse_forced_replies() -> None:
    content, calls = parse_reply('{"city": "Paris"}', TOOLS, "named", "get_weather")
    assert content is None and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    content, calls = parse_reply('{"name": "get_time", "arguments": {"zone": "UTC"}}', TOOLS, "required")
    assert calls[0]["function"]["name"] == "get_time"


def _run(stream: ToolCallStream, pieces: list[str]) -> tuple[list[dict], bool]:
    out = [d for p in pieces for d in stream.feed(p)]
    last, called = stream.finish()
    return out + last, called


def test_stream_named_call_streams_its_arguments() -> None:
    deltas, called = _run(ToolCallStream(TOOLS, "named", "get_weather"), ['{"ci', 'ty": "Ro', 'me"}'])
    assert called
    head = deltas[0]["tool_calls"][0]
    assert head["index"] == 0 and head["function"] == {"name": "get_weather", "arguments": ""} and head["id"]
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:]) == '{"city": "Rome"}'


def test_stream_auto_text_flows_and_calls_come_whole() -> None:
    deltas, called = _run(ToolCallStream(TOOLS, "auto"), ["It is ", "sunny <", "3"])
    assert not called and "".join(d["content"] for d in deltas) == "It is sunny <3"
    pieces = ["Sure. <tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}</tool_call>']
    deltas, called = _run(ToolCallStream(TOOLS, "auto"), pieces)
    assert called
    assert deltas[0] == {"content": "Sure. "}
    assert deltas[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert json.loads(deltas[2]["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    # a JSON-looking reply that is no call comes out as content at the end
    deltas, called = _run(ToolCallStream(TOOLS, "auto"), ['{"a"', ": 1}"])
    assert not called and "".join(d["content"] for d in deltas) == '{"a": 1}'
