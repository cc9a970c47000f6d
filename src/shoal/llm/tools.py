"""OpenAI tool calling on chat completions: tools into the prompt, forced calls constrained, replies
parsed into ``tool_calls``.

How a request's ``tools`` and ``tool_choice`` run:

- **The prompt.** A chat template that speaks tools (its text mentions ``tools``, as Qwen's, Llama
  3.1's or Hermes' do) gets them as the ``tools`` template variable, and earlier assistant turns keep
  their ``tool_calls``. Any other template (the bundled SmolLM2's) gets a system message that lists
  the functions as JSON schemas and asks for calls in the Hermes form
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the form most open models were
  trained on; earlier calls are written back into their turns in that form.
- **``tool_choice``.** ``"none"``: the tools are left out of the prompt and nothing is parsed.
  ``"auto"`` (the default with tools): the model writes what it likes and the reply is parsed
  (`parse_reply`). ``"required"`` and a named function are *forced*: decoding is constrained to a
  JSON schema (the engines' structured-output path), so the call always parses: for a named function
  the schema is its ``parameters`` and the text is the arguments; for ``required`` it is
  ``{"name": <one of the tools>, "arguments": <its parameters>}``. One call per reply.
- **Streaming.** A named function's arguments stream as they are generated, as OpenAI streams them
  (`ToolCallStream`); other calls are sent once their text is complete; text that cannot be the start
  of a call streams as ``content`` at once.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"


class ToolRequestError(ValueError):
    """A bad ``tools`` / ``tool_choice``; `param` names the field (for the 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def check_tools(tools: Optional[list[Any]]) -> list[dict[str, Any]]:
    """OpenAI's ``tools``: a list of ``{"type": "function", "function": {"name", "description"?,
    "parameters"?}}``; returns it with each function's parameters defaulted to an open object."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ToolRequestError("tools", "tools must be a list of function tools")
    out = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ToolRequestError(f"tools[{i}]", 'each tool must be {"type": "function", "function": {...}}')
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "_-" for c in name):
            raise ToolRequestError(f"tools[{i}].function.name",
                                   "a function name is 1-64 letters, digits, underscores or dashes")
        if name in seen:
            raise ToolRequestError(f"tools[{i}].function.name", f"function {name!r} is listed twice")
        seen.add(name)
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ToolRequestError(f"tools[{i}].function.parameters", "parameters must be a JSON schema object")
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return out


def check_tool_choice(choice: Any, tools: list[dict[str, Any]]) -> tuple[str, Optional[str]]:
    """``(mode, function name)``: mode is ``none``, ``auto``, ``required`` or ``named``."""
    if choice is None:
        return ("auto" if tools else "none"), None
    if not tools:
        raise ToolRequestError("tool_choice", "'tool_choice' is only allowed when 'tools' are specified.")
    if choice in ("none", "auto", "required"):
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        names = [t["function"]["name"] for t in tools]
        if name not in names:
            raise ToolRequestError("tool_choice", f"tool_choice names function {name!r}, which is not in tools "
                                                  f"({', '.join(names)})")
        return "named", name
    raise ToolRequestError("tool_choice", 'tool_choice must be "none", "auto", "required" or '
                                          '{"type": "function", "function": {"name": ...}}')


# --------------------------------------------------------------------------------------------------
# The prompt
# --------------------------------------------------------------------------------------------------


def template_speaks_tools(template: Optional[str]) -> bool:
    """Whether a chat template renders a ``tools`` variable itself."""
    return bool(template) and "tools" in template  # type: ignore[operator]


def _arguments_object(arguments: Any) -> Any:
    """A call's arguments as the templates expect them (an object); OpenAI sends a JSON string."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _call_text(call: dict[str, Any]) -> str:
    fn = call.get("function") or {}
    body = {"name": fn.get("name"), "arguments": _arguments_object(fn.get("arguments") or {})}
    return f"{CALL_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{CALL_CLOSE}"


def _tools_system_text(tools: list[dict[str, Any]]) -> str:
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return (
        "You can call these functions (JSON schemas):\n"
        f"{listing}\n"
        "To call a function, reply with only:\n"
        f'{CALL_OPEN}\n{{"name": "<function name>", "arguments": {{<arguments>}}}}\n{CALL_CLOSE}'
    )


def render_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]], mode: str,
                    template: Optional[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(messages, extra template variables)`` for the chat template (see the module docstring)."""
    native = template_speaks_tools(template)
    offered = tools if mode != "none" else []
    out: list[dict[str, Any]] = []
    for message in messages:
        calls = message.get("tool_calls")
        if native:
            m = dict(message)
            if calls:
                m["tool_calls"] = [{**c, "function": {**(c.get("function") or {}),
                                                      "arguments": _arguments_object((c.get("function") or {})
                                                                                     .get("arguments"))}}
                                   for c in calls]
            if m.get("content") is None:
                m["content"] = ""
            out.append(m)
            continue
        content = message.get("content") or ""
        if calls:
            content = "\n".join([content] * bool(content) + [_call_text(c) for c in calls])
        out.append({"role": message["role"], "content": content})
    if not offered:
        return out, {}
    if native:
        return out, {"tools": offered}
    text = _tools_system_text(offered)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}"}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out, {}


def forced_response_format(tools: list[dict[str, Any]], mode: str, name: Optional[str]) -> Optional[dict[str, Any]]:
    """The JSON schema that constrains a forced call (None unless mode is ``required`` or ``named``)."""
    if mode == "named":
        fn = next(t["function"] for t in tools if t["function"]["name"] == name)
        return {"type": "json_schema", "json_schema": {"name": name, "schema": fn["parameters"]}}
    if mode == "required":
        options = [
            {"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                              "arguments": t["function"]["parameters"]},
             "required": ["name", "arguments"], "additionalProperties": False}
            for t in tools
        ]  # fmt: skip
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}
    return None


# --------------------------------------------------------------------------------------------------
# The reply
# --------------------------------------------------------------------------------------------------


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_call(name: str, arguments: str, call_id: Optional[str] = None) -> dict[str, Any]:
    """One entry of a message's ``tool_calls``: `arguments` is JSON text, as OpenAI sends it."""
    return {"id": call_id or new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _as_call(obj: Any, names: set[str]) -> Optional[dict[str, Any]]:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return tool_call(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_reply(text: str, tools: list[dict[str, Any]], mode: str,
                name: Optional[str] = None) -> tuple[Optional[str], list[dict[str, Any]]]:
    """``(content, tool_calls)`` of a finished reply. Forced replies are a call by construction (the
    schema held); an ``auto`` reply is calls where it has ``<tool_call>`` blocks of a known function,
    or where the whole reply is one such JSON object, and content otherwise."""
    if mode == "none" or not tools:
        return text, []
    if mode == "named":
        return None, [tool_call(name or "", text.strip())]
    names = {t["function"]["name"] for t in tools}
    if mode == "required":
        try:
            call = _as_call(json.loads(text), names)
        except ValueError:
            call = None
        return (None, [call]) if call else (text, [])
    calls: list[dict[str, Any]] = []
    rest: list[str] = []
    pos = 0
    while True:
        start = text.find(CALL_OPEN, pos)
        if start < 0:
            rest.append(text[pos:])
            break
        end = text.find(CALL_CLOSE, start)
        body = text[start + len(CALL_OPEN): end if end >= 0 else len(text)]
        try:
            call = _as_call(json.loads(body), names)
        except ValueError:
            call = None
        if call is None:
            rest.append(text[pos:])  # not a call after all: leave the text as it was
            break
        calls.append(call)
        rest.append(text[pos:start])
        if end < 0:
            break
        pos = end + len(CALL_CLOSE)
    if not calls:
        stripped = text.strip()
        if stripped.startswith("{"):
            try:
                call = _as_call(json.loads(stripped), names)
            except ValueError:
                call = None
            if call is not None:
                return None, [call]
        return text, []
    content = "".join(rest).strip()
    return content or None, calls


@dataclass
class ToolCallStream:
    """Turns a streamed reply's text pieces into OpenAI chat-chunk deltas (see the module docstring).

    `feed` takes each piece and returns the deltas to send now; `finish` returns the last ones and
    whether the reply made calls (its finish_reason is then ``tool_calls``).
    """

    tools: list[dict[str, Any]]
    mode: str
    name: Optional[str] = None
    _held: list[str] = field(default_factory=list)
    _holding: bool = False  # auto: the text may be (or is) a call; wait for the end
    _started: bool = False  # named: the call's head delta was sent
    _streamed: list[str] = field(default_factory=list)  # auto: content already sent

    def feed(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        if self.mode == "none":
            return [{"content": text}]
        if self.mode == "named":
            out = []
            if not self._started:
                self._started = True
                out.append({"content": None, "tool_calls": [
                    {"index": 0, **tool_call(self.name or "", "")}]})
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return out
        self._held.append(text)
        if self.mode == "required" or self._holding:
            return []
        held = "".join(self._held)
        if not self._streamed and held.lstrip().startswith("{"):
            self._holding = True  # a whole-reply JSON call, perhaps
            return []
        # Send what cannot be part of a call opener; hold from a "<" that may start one.
        at = held.find("<")
        while at >= 0:
            tail = held[at:]
            if tail.startswith(CALL_OPEN):
                self._holding = True
                break
            if CALL_OPEN.startswith(tail):
                break  # a prefix of the opener: wait for more
            at = held.find("<", at + 1)
        cut = len(held) if at < 0 else at
        if cut == 0 and not held.strip():
            return []  # leading whitespace: send it with what follows
        out = held[:cut]
        self._held = [held[cut:]] if cut < len(held) else []
        if not out:
            return []
        self._streamed.append(out)
        return [{"content": out}]

    def finish(self) -> tuple[list[dict[str, Any]], bool]:
        """The deltas still to send, and whether they are calls."""
        if self.mode == "none":
            return [], False
        if self.mode == "named":
            return ([] if self._started else [{"content": None, "tool_calls": [
                {"index": 0, **tool_call(self.name or "", "{}")}]}]), True
        held = "".join(self._held)
        self._held = []
        before = "".join(self._streamed)
        content, calls = parse_reply(before + held, self.tools, self.mode)
        if not calls:
            return ([{"content": held}] if held else []), False
        out: list[dict[str, Any]] = []
        # Text before the first call that was not sent yet goes out as content first.
        extra = (content or "")[len(before.strip()):].strip() if content else ""
        if extra:
            out.append({"content": extra})
        for i, call in enumerate(calls):
            fn = call["function"]
            out.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                        "function": {"name": fn["name"], "arguments": ""}}]})
            out.append({"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]})
        return out, True
