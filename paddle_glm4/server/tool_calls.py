"""Tool calls: OpenAI's `tools` / `tool_calls` / `role: "tool"` on one side, GLM-4's chat format on the other.

GLM-4's chat template shows the model its tools in a `<|system|>` block, and writes a tool call as an assistant
turn whose first line (the turn's "metadata") is the function name and whose content is the arguments as JSON:

    <|assistant|>get_weather
    {"city": "Beijing"}<|observation|>
    {"temperature": 20}<|assistant|>
    It is 20 degrees in Beijing.

The model answers the same way: a plain answer starts with an empty first line ("\\nIt is ..."), a call with the
function's name; after a call it hands over with <|observation|>, a stop token. Several calls in one answer
are separate `<|assistant|>` segments.
"""

from __future__ import annotations

import uuid

from ..validation import SchemaError, parse_json
from .errors import APIError
from .schemas import ChatMessage, FunctionCall, NamedToolChoice, Tool, ToolCall


def active_tools(tools: list[Tool] | None, tool_choice: str | NamedToolChoice | None) -> list[Tool]:
    """The tools the model is shown. "none" hides them; a named function is the only one shown, which is as
    close to forcing it as GLM-4's format allows. "auto" and "required" show them all."""
    tools = tools or []
    if tool_choice == "none":
        return []
    if isinstance(tool_choice, NamedToolChoice):
        chosen = [tool for tool in tools if tool.function.name == tool_choice.function.name]
        if not chosen:
            raise APIError(
                400,
                f"tool_choice names function {tool_choice.function.name!r}, which is not in tools",
                param="tool_choice",
            )
        return chosen
    return tools


def to_glm_messages(messages: list[ChatMessage], tools: list[Tool]) -> list[dict]:
    """OpenAI chat messages as the messages GLM-4's chat template takes."""
    glm: list[dict] = []
    if tools:
        # A system turn with no content renders only the tool block; the client's own system message follows.
        glm.append({"role": "system", "content": "", "tools": [tool.model_dump(exclude_none=True) for tool in tools]})
    for message in messages:
        if message.role == "tool":
            glm.append({"role": "observation", "content": message.text()})
        elif message.role == "assistant":
            if message.text():
                glm.append({"role": "assistant", "content": message.text()})
            for call in message.tool_calls or []:
                glm.append({"role": "assistant", "metadata": call.function.name, "content": call.function.arguments})
        else:
            role = "system" if message.role == "developer" else message.role
            glm.append({"role": role, "content": message.text()})
    return glm


def parse_reply(segments: list[str], tool_names: set[str]) -> tuple[str, list[ToolCall]] | None:
    """(content, tool calls) of an answer cut at its `<|assistant|>` tokens, or None when it is not a well-formed
    tool call: a first line that names no offered function, or arguments that are not a JSON object."""
    content, calls = [], []
    for segment in segments:
        name, _, arguments = segment.partition("\n")
        name = name.strip()
        if not name:
            content.append(arguments)
            continue
        try:
            parsed = parse_json(arguments, "the tool call's arguments")  # the model's text: no bombs, no NaN
        except SchemaError:
            return None
        if name not in tool_names or not isinstance(parsed, dict):
            return None
        calls.append(
            ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments.strip()))
        )
    if not calls:
        return None
    return "".join(content).strip(), calls
