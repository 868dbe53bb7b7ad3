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

import contextlib
import functools
import json
import math
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

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


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    special_tokens: Iterable[str],
    *,
    add_generation_prompt: bool = False,
    name: str = "the chat template",
) -> RenderedChat:
    """Render `messages` with `template` and locate the template's own special tokens in the result. `name` says
    where the template comes from, in errors (e.g. "the chat template of DIR/tokenizer_config.json")."""
    messages = validate_messages(messages)
    finder = _alternation(tuple(special_tokens))
    text = _render(template, name, messages, add_generation_prompt)
    if not any(finder.search(s) for s in _strings(messages)):
        return RenderedChat(text, tuple(_split(text, finder)))

    sentinels = _sentinels(messages, finder, text)
    defused = _replace_strings(messages, lambda s: finder.sub(lambda m: sentinels[m.group()], s))
    restore = {sentinel: token for token, sentinel in sentinels.items()}
    restorer = re.compile("|".join(map(re.escape, restore)))
    pieces = tuple(
        (piece if special else restorer.sub(lambda m: restore[m.group()], piece), special)
        for piece, special in _split(_render(template, name, defused, add_generation_prompt), finder)
    )
    if "".join(piece for piece, _ in pieces) != text:
        raise ChatTemplateError(
            f"{name} treats special-token text inside a message differently from other text, "
            "so its own special tokens cannot be told apart from the user's"
        )
    return RenderedChat(text, pieces)


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check every field the template can render; return the messages as plain JSON-like data.

    A template turns whatever it is given into text, so a value that is not text (bytes, a set, an object with
    its own __str__) would be rendered as its repr, out of sight of the special-token check. So: `role` one of
    ROLES, `content` a string (or a list of {"type": "text", "text": ...} parts, joined), `metadata` a string, and
    everything else (tools, ...) JSON data: dicts with string keys, lists, strings, finite numbers, booleans, None.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"message {index} must be a dict with a 'role', got {type(message).__name__}")
        if "role" not in message:
            raise ChatTemplateError(f"message {index} has no 'role'; expected one of {', '.join(ROLES)}")
        if message["role"] not in ROLES:
            raise ChatTemplateError(
                f"message {index} has unknown role {message['role']!r}; expected one of {', '.join(ROLES)}"
            )
        where = f"message {index} ({message['role']})"
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            content = "".join(_text_part(part, f"{where}: content[{i}]") for i, part in enumerate(content))
        elif content is not None and not isinstance(content, str):
            raise ChatTemplateError(
                f"{where}: content must be a string or a list of text parts, got {type(content).__name__}"
            )
        if message.get("metadata") is not None and not isinstance(message["metadata"], str):
            raise ChatTemplateError(f"{where}: metadata must be a string, got {type(message['metadata']).__name__}")
        message = _json_data(
            {**message, "content": content} if "content" in message else message, f"message {index}", 0
        )
        checked.append(message)
    return checked


# Deeper than any tool's JSON schema, shallow enough that nothing recurses near Python's limit.
MAX_DEPTH = 32


def _json_data(value: Any, where: str, depth: int) -> Any:
    """`value` as plain JSON data (exact str, int, float, bool, None, list, dict with str keys), or an error
    naming where the first other value is. Subclasses of str and numbers become their plain values, so that no
    __str__ or __format__ of the caller's can change what is rendered."""
    if depth > MAX_DEPTH:
        raise ChatTemplateError(f"{where}: nested more than {MAX_DEPTH} levels deep")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ChatTemplateError(f"{where}: {value} is not a finite number")
        return float.__float__(value)
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ChatTemplateError(f"{where}: keys must be strings, got {type(key).__name__} {key!r:.40}")
            result[str.__str__(key)] = _json_data(item, f"{where}.{key}", depth + 1)
        return result
    if isinstance(value, (list, tuple)):
        return [_json_data(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise ChatTemplateError(
        f"{where}: {type(value).__name__} is not allowed in a message; use strings, numbers, "
        "booleans, None, lists and dicts"
    )


def _text_part(part: Any, where: str) -> str:
    if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise ChatTemplateError(
            f"{where}: content must be a string or a list of text parts, and this part is not "
            "{'type': 'text', 'text': <string>} (only text is supported)"
        )
    return part["text"]


def tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """JSON as chat templates expect it: unescaped text, keys in their given order (unlike Jinja's filter)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise _Rejected(message)


class _Rejected(Exception):
    """raise_exception() in a template: the template refuses the conversation."""


# ---- running a template that came with a downloaded model ---------------------------------------------------
# A chat template is code from tokenizer_config.json. Jinja's sandbox keeps it away from Python's internals; these
# limits keep it from exhausting the machine: no other templates (import, include, extends), bounded text, time.
MAX_OUTPUT_CHARS = 4_000_000  # far above any conversation GLM-4's 128K-token context holds (~0.5M characters)
MAX_VALUE_CHARS = MAX_OUTPUT_CHARS  # any string or list the template builds on the way
MAX_SECONDS = 5.0
MAX_INT_BITS = 4096
_FORBIDDEN_TAGS = {"Import": "import", "FromImport": "from ... import", "Include": "include", "Extends": "extends"}
# A width of 7 or more digits in a format string: "{:>9999999}" or "%9999999s" builds that many characters.
_WIDE_FORMAT = re.compile(r"\d{7,}|%[-#0 +]*\*")


class TemplateLimitError(Exception):
    """The template went past one of the limits above."""


def _too_big(what: str, size: int):
    if size > MAX_VALUE_CHARS:
        raise TemplateLimitError(f"{what} would hold {size} items; the limit is {MAX_VALUE_CHARS}")


def _sized(value: Any, what: str) -> Any:
    if isinstance(value, (str, list, tuple, dict)):
        _too_big(what, len(value))
    return value


def _check_arguments(what: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """A number big enough to ask for a huge string (center(10**9), ' ' * n) is refused before the call."""
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_VALUE_CHARS:
            raise TemplateLimitError(f"{what} was given {arg}; numbers that size could build too much text")
        if isinstance(arg, str) and what in ("format", "%") and _WIDE_FORMAT.search(arg):
            raise TemplateLimitError(f"the format string {arg[:40]!r} asks for a huge width")


def _estimate(what: str, target: Any, args: Sequence[Any]) -> None:
    """Size checks that need the arguments: the result of replace and join, before they are built."""
    if what == "replace" and isinstance(target, str) and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        old, new = args[0], args[1]
        _too_big("replace's result", len(target) + (target.count(old) if old else len(target) + 1) * len(new))
    if what == "join" and isinstance(args[0] if args else None, str) and hasattr(target, "__len__"):
        items = sum(len(str(item)) for item in target) if isinstance(target, (list, tuple)) else 0
        _too_big("join's result", items + len(args[0]) * len(target))


def _limited_filter(name: str, function, passes_context: bool):
    @functools.wraps(function)  # which keeps the marks that make Jinja pass its context (or environment) first
    def limited(*args, **kwargs):
        values = args[1:] if passes_context else args
        _check_arguments(name, values[1:], kwargs)
        if values:
            _estimate(name, values[0], values[1:])
        return _sized(function(*args, **kwargs), f"the result of filter {name!r}")

    return limited


def _environment():
    from jinja2.compiler import CodeGenerator
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import _PassArg

    class LimitedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node, frame):  # `a ~ b`: joined by the environment, which checks the size first
            self.write("environment.concat_limited((")
            for argument in node.nodes:
                self.visit(argument, frame)
                self.write(", ")
            self.write("))")

    class LimitedEnvironment(ImmutableSandboxedEnvironment):
        code_generator_class = LimitedCodeGenerator
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context, operator, left, right):
            if isinstance(left, int) and isinstance(right, int) and operator in ("*", "**"):
                bits = left.bit_length() * (abs(right) if operator == "**" else 1) + right.bit_length()
                if bits > MAX_INT_BITS:  # Python's big integers would take minutes (or all memory) to compute
                    raise TemplateLimitError(f"an integer of about {bits} bits is too large")
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                        _too_big("a repeated sequence", len(seq) * times)
            if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, type(left)):
                _too_big("a concatenation", len(left) + len(right))
            if operator == "%" and isinstance(left, str):
                _check_arguments("%", [left], {})
            return _sized(super().call_binop(context, operator, left, right), "a result")

        def call(__self, __context, __obj, *args, **kwargs):
            method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
            name = getattr(method, "__name__", "a call")
            _check_arguments(name, args, kwargs)
            if name in ("format", "format_map"):
                _check_arguments("format", [getattr(method, "__self__", "")], {})
            _estimate(name, getattr(method, "__self__", None), args)
            return _sized(super().call(__context, __obj, *args, **kwargs), f"the result of {name}")

        def concat_limited(self, values):
            pieces = [str(value) for value in values]
            _too_big("a ~ concatenation", sum(map(len, pieces)))
            return "".join(pieces)

    env = LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {
        name: _limited_filter(name, function, _PassArg.from_obj(function) is not None)
        for name, function in env.filters.items()
    }
    env.globals["raise_exception"] = _raise_exception
    return env


@functools.lru_cache(maxsize=8)
def compile_template(template: str, name: str = "the chat template") -> jinja2.Template:
    """The compiled template, or a ChatTemplateError naming it: bad syntax, or a tag that reaches for other
    templates (import, include, extends)."""
    from jinja2 import TemplateError, nodes

    env = _environment()
    try:
        tree = env.parse(template)
    except TemplateError as err:
        raise ChatTemplateError(f"{name} is not a valid Jinja template: {err}") from None
    for node in tree.find_all((nodes.Import, nodes.FromImport, nodes.Include, nodes.Extends)):
        raise ChatTemplateError(
            f"{name} uses '{_FORBIDDEN_TAGS[type(node).__name__]}' (line {node.lineno}); "
            "a chat template must be self-contained"
        )
    try:
        return env.from_string(tree)
    except TemplateError as err:
        raise ChatTemplateError(f"{name} is not a valid Jinja template: {err}") from None


def _render(template: str, name: str, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    compiled = compile_template(template, name)
    pieces, size = [], 0
    try:
        with _deadline(MAX_SECONDS):
            for piece in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt):
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    raise TemplateLimitError(f"its output passed {MAX_OUTPUT_CHARS} characters")
                pieces.append(piece)
    except _Rejected as err:
        raise ChatTemplateError(f"{name} rejected the conversation: {err}") from None
    except TemplateLimitError as err:
        raise ChatTemplateError(f"{name} was stopped: {err}") from None
    except RecursionError:
        raise ChatTemplateError(f"{name} was stopped: it recursed too deeply") from None
    except MemoryError:
        raise ChatTemplateError(f"{name} was stopped: it ran out of memory") from None
    except Exception as err:  # noqa: BLE001 - anything a template does wrong is the template's error
        raise ChatTemplateError(f"{name} failed: {type(err).__name__}: {err}") from None
    return "".join(pieces)


@contextlib.contextmanager
def _deadline(seconds: float):
    """Stop the template's code once `seconds` have passed, by a trace function on the template's own frames
    (Jinja compiles templates to Python code in '<template>'). Where a debugger or coverage tool is already
    tracing this thread, it is left alone and there is no time limit."""
    if sys.gettrace() is not None:
        yield
        return
    end = time.monotonic() + seconds

    def on_line(frame, event, arg):
        if time.monotonic() > end:
            raise TemplateLimitError(f"it ran longer than {seconds:g} s")
        return on_line

    sys.settrace(lambda frame, event, arg: on_line if frame.f_code.co_filename == "<template>" else None)
    try:
        yield
    finally:
        sys.settrace(None)


@functools.lru_cache(maxsize=8)
def _alternation(tokens: tuple[str, ...]) -> re.Pattern:
    # Longest first, so that a token wins over any token it contains.
    longest_first = sorted(tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, longest_first)) or "(?!)")


def _split(text: str, finder: re.Pattern) -> Iterator[tuple[str, bool]]:
    start = 0
    for match in finder.finditer(text):
        if match.start() > start:
            yield text[start : match.start()], False
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
