"""Tool calls on /v1/chat/completions: `tools`, `tool_choice`, `tool_calls` back, `tool` messages in.

A chat template that takes `tools` (as transformers passes them) renders them itself; for one that
does not (SmolLM2's, Gemma's), a system message lists the tools in the Hermes format that small
instruction-tuned models (SmolLM2, Qwen) learnt: their JSON schemas inside <tools></tools>, and a
call written as <tool_call>{"name": ..., "arguments": {...}}</tool_call>. That is also the format
parsed back out of the reply (the documented fallback for any model). An assistant message's
`tool_calls` are written back in the same form, a `tool` message's content inside
<tool_response></tool_response>.

`tool_choice` "required" or a named function constrains the reply to such a call (serve/grammar.py:
a Lark grammar whose arguments follow the function's JSON schema), so even a model that would not
call a tool by itself writes a valid one; "auto" lets the model choose; "none" leaves the tools out.
"""

from __future__ import annotations

import json
import re
import uuid

from .grammar import JSON_DEFAULTS, lark_grammar

CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


class ToolError(ValueError):
    """A `tools` / `tool_choice` / message the server cannot use: an API 400."""


def functions(tools: list[dict]) -> list[dict]:
    """The tools' function specs (name, description, parameters), checked."""
    out = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(f, dict) \
                or not isinstance(f.get("name"), str) or not f["name"]:
            raise ToolError(f"tools[{i}]: a {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolError(f"tools[{i}].function.parameters: a JSON schema object")
        out.append({"name": f["name"], "description": f.get("description", ""), "parameters": params})
    return out


def chosen(fns: list[dict], tool_choice) -> tuple[list[dict], bool]:
    """(the functions the reply may call, whether it must call one) for a tool_choice."""
    if tool_choice in (None, "auto"):
        return fns, False
    if tool_choice == "none":
        return [], False
    if tool_choice == "required":
        return fns, True
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        named = [f for f in fns if f["name"] == name]
        if not named:
            raise ToolError(f"tool_choice: no tool named {name!r}")
        return named, True
    raise ToolError("tool_choice: 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}")


def system_prompt(fns: list[dict]) -> str:
    listed = "\n".join(json.dumps({"type": "function", "function": f}) for f in fns)
    return ("You are a function calling AI model. You may call one or more functions to assist with the user "
            f"query. Here are the available tools:\n<tools>\n{listed}\n</tools>\nTo call a function, reply with "
            'a JSON object with the function name and arguments within <tool_call></tool_call> tags:\n'
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def messages_with_tools(messages: list[dict], fns: list[dict], template_takes_tools: bool) -> list[dict]:
    """The conversation as the template will see it: assistant tool_calls and tool results as text,
    and (for a template that does not render `tools`) the tools in a system message."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if m["role"] == "assistant" and calls:
            text = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                           "arguments": _arguments(c["function"])}) + "\n</tool_call>"
                             for c in calls)
            m["content"] = ((m.get("content") or "") + "\n" + text).strip()
        elif m["role"] == "tool":
            m["content"] = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
        m.pop("tool_call_id", None)
        m.pop("name", None)
        out.append(m)
    if fns and not template_takes_tools:
        prompt = system_prompt(fns)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _arguments(function: dict):
    args = function.get("arguments", "{}")
    try:
        return json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        raise ToolError(f"messages: the arguments of a tool call to {function.get('name')!r} are not JSON") from None


def call_grammar(fns: list[dict]) -> str:
    """An llguidance grammar for one <tool_call> to one of fns, its arguments per the function's schema."""
    schema = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                         "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]}} for f in fns],
              "x-guidance": JSON_DEFAULTS}  # compact, as response_format's JSON
    lark = 'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json ' + json.dumps(schema)
    return lark_grammar(lambda: lark, "tools: the functions' parameters cannot be used")


def parse(text: str, fns: list[dict]) -> tuple[str | None, list[dict]]:
    """(the reply's text outside tool calls, or None; its tool calls in OpenAI's shape)."""
    names = {f["name"] for f in fns}
    calls = []
    for m in CALL.finditer(text):
        try:
            call = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and call.get("name") in names and isinstance(call.get("arguments", {}), dict):
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}})
    if not calls:
        return text, []
    rest = CALL.sub("", text).strip()
    return rest or None, calls
