"""Chat templates: render a model's Jinja chat template as Hugging Face does, and tell the template's own special
tokens apart from special-token text that the user typed.

The rendered text is exactly what transformers users get from the same template: the same sandboxed Jinja
environment (trim_blocks, lstrip_blocks, loop controls), a `tojson` filter built on `json.dumps` (Jinja's own
escapes HTML characters and sorts keys) and a `raise_exception` global.

Safety: in the published tokenizer, a message whose content contains "<|assistant|>" becomes a real assistant
turn. Here only the special tokens written by the template itself count. When some user-supplied string (any
string or key anywhere in the messages) contains special-token text, the template is rendered a second time with
each such occurrence replaced by a sentinel of private-use characters; the special tokens left in that rendering
are the template's own. The sentinels are then turned back into their text, which must give the first rendering
exactly (otherwise the template looked inside the user's special-token text, and we refuse rather than guess).
A template that glued a fragment of user text to a fragment of its own literal text into a special token would
escape this check; GLM-4's template only puts user text between complete tokens and newlines.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "observation")

# What a model gets when its tokenizer_config.json has no chat template: GLM-4's turn structure, and for tool
# definitions only their names and JSON schemas under a system turn (no instructions in any language). As in
# GLM-4's template, trim_blocks drops the first newline after each block tag, so "\n\n## " prints "\n## ".
STRUCTURAL_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for item in messages %}"
    "{% if item['tools'] is defined %}<|system|>"
    "{% for tool in item['tools'] %}"
    "{% if tool['type'] == 'function' %}\n\n## {{ tool['function']['name'] }}\n\n"
    "{{ tool['function'] | tojson(indent=4) }}"
    "{% else %}\n\n## {{ tool['type'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ChatTemplateError(ValueError):
    """A conversation the chat template cannot render, or a template that fails."""


@dataclass(frozen=True)
class RenderedChat:
    """A rendered conversation: its text, and that text cut at the special tokens the template wrote.

    `pieces` is a sequence of (text, is_template_special); joining the texts gives `text`. Special-token text
    that came from the user sits inside a plain piece.
    """

    text: str
    pieces: tuple[tuple[str, bool], ...]


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], special_tokens: Iterable[str], *,
                add_generation_prompt: bool = False) -> RenderedChat:
    """Render `messages` with `template` and locate the template's own special tokens in the result."""
    messages = validate_messages(messages)
    finder = _alternation(tuple(special_tokens))
    text = _render(template, messages, add_generation_prompt)
    if not any(finder.search(s) for s in _strings(messages)):
        return RenderedChat(text, tuple(_split(text, finder)))

    sentinels = _sentinels(messages, finder, text)
    defused = _replace_strings(messages, lambda s: finder.sub(lambda m: sentinels[m.group()], s))
    restore = {sentinel: token for token, sentinel in sentinels.items()}
    restorer = re.compile("|".join(map(re.escape, restore)))
    pieces = tuple((piece if special else restorer.sub(lambda m: restore[m.group()], piece), special)
                   for piece, special in _split(_render(template, defused, add_generation_prompt), finder))
    if "".join(piece for piece, _ in pieces) != text:
        raise ChatTemplateError("the chat template treats special-token text inside a message differently from "
                                "other text, so its own special tokens cannot be told apart from the user's")
    return RenderedChat(text, pieces)


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check the roles and contents the template relies on; return the messages as plain dicts."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"message {index} must be a dict with a 'role', got {type(message).__name__}")
        if "role" not in message:
            raise ChatTemplateError(f"message {index} has no 'role'; expected one of {', '.join(ROLES)}")
        if message["role"] not in ROLES:
            raise ChatTemplateError(f"message {index} has unknown role {message['role']!r}; "
                                    f"expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise ChatTemplateError(f"message {index} ({message['role']}): content must be a string, "
                                    f"got {type(content).__name__}")
        checked.append(dict(message))
    return checked


def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
           separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """JSON as chat templates expect it: unescaped text, keys in their given order (unlike Jinja's filter)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise ChatTemplateError(f"the chat template rejected the conversation: {message}")


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def _render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:
        raise ChatTemplateError(f"the chat template failed: {err}") from err


@functools.lru_cache(maxsize=8)
def _alternation(tokens: tuple[str, ...]) -> re.Pattern:
    # Longest first, so that a token wins over any token it contains.
    longest_first = sorted(tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, longest_first)) or "(?!)")


def _split(text: str, finder: re.Pattern) -> Iterator[tuple[str, bool]]:
    start = 0
    for match in finder.finditer(text):
        if match.start() > start:
            yield text[start:match.start()], False
        yield match.group(), True
        start = match.end()
    if start < len(text):
        yield text[start:], False


def _strings(value: Any) -> Iterator[str]:
    """Every string in a message structure, dict keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _replace_strings(value: Any, replace) -> Any:
    if isinstance(value, str):
        return replace(value)
    if isinstance(value, Mapping):
        return {_replace_strings(k, replace): _replace_strings(v, replace) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_strings(item, replace) for item in value]
    return value


def _sentinels(messages: list[dict[str, Any]], finder: re.Pattern, text: str) -> dict[str, str]:
    """A stand-in for each special token the messages contain: a private-use character found in neither them nor
    `text`, padded with another such character to the token's length (so that a template measuring a message
    still sees the same length)."""
    tokens = sorted({match.group() for s in _strings(messages) for match in finder.finditer(s)})
    used = set(text).union(*_strings(messages))
    free = (chr(code) for code in range(0xF0000, 0xFFFFE) if chr(code) not in used)
    filler = next(free)
    return {token: next(free) + filler * (len(token) - 1) for token in tokens}
