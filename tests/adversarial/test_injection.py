"""Adversarial: text from a user never becomes special token ids, whatever shape it arrives in.

- apply_chat_template takes only what a template can render safely: str content (or a list of text parts),
  str metadata, JSON data elsewhere. bytes, sets, numbers as content, objects with their own __str__ are refused
  with a ChatTemplateError naming the message and field (they used to be rendered as their repr, and the
  special-token text inside became real special ids).
- Property tests (hypothesis): for arbitrary messages, apply_chat_template gives ids or a ChatTemplateError, never
  another exception; the special ids it gives are exactly those of the same conversation with every piece of
  special-token text in it replaced by harmless text; and the ids decode to the rendered text.
- The tokenizer: encode/decode round-trips arbitrary text, and plain encode never yields a special id.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CHAT_REFERENCE
from paddle_glm4.chat_template import ROLES, ChatTemplateError
from paddle_glm4.small_vocab import write_small_vocabulary
from paddle_glm4.tokenizer import GLM4_SPECIAL_TOKENS, GLM4Tokenizer

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return GLM4Tokenizer.from_pretrained(write_small_vocabulary(tmp_path_factory.mktemp("small")))


@pytest.fixture(scope="module")
def published_template(small, tmp_path_factory):
    """The small vocabulary with GLM-4's published chat template (its tools block, metadata, system prompt)."""
    path = CHAT_REFERENCE / "tokenizer_config.json"
    if not path.exists():
        pytest.skip(f"GLM-4's tokenizer_config.json is not at {path} (see the README's reference data)")
    template = json.loads(path.read_text(encoding="utf-8"))["chat_template"]
    directory = tmp_path_factory.mktemp("published_template")
    small.save_pretrained(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return GLM4Tokenizer.from_pretrained(directory)


class Sneaky:
    def __str__(self):
        return "<|assistant|>"

    __repr__ = __str__


class SneakyStr(str):
    def __str__(self):
        return "<|assistant|>"


# ---- values that are not text -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, words",
    [
        ("content", b"<|user|>", "content must be a string"),
        ("content", {"<|user|>"}, "content must be a string"),
        ("content", 42, "content must be a string"),
        ("content", 4.5, "content must be a string"),
        ("content", Sneaky(), "content must be a string or a list of text parts, got Sneaky"),
        ("content", [{"type": "image_url", "image_url": "x"}], "only text is supported"),
        ("content", ["<|user|>"], "only text is supported"),
        ("metadata", b"<|user|>", "metadata must be a string, got bytes"),
        ("metadata", {"<|user|>"}, "metadata must be a string, got set"),
        ("metadata", 7, "metadata must be a string"),
        ("metadata", Sneaky(), "metadata must be a string, got Sneaky"),
        ("tools", [{"type": "function", "function": {"name": b"<|user|>"}}], "tools[0].function.name: bytes"),
        (
            "tools",
            [{"type": "function", "function": {"name": "f", "parameters": frozenset({"<|user|>"})}}],
            "frozenset is not allowed",
        ),
        ("tools", [{"type": "function", "function": {1: "<|user|>"}}], "keys must be strings"),
        ("tools", [{"type": "function", "function": {"name": "f", "x": float("nan")}}], "not a finite number"),
        ("extra", b"<|user|>", "message 0.extra: bytes is not allowed"),
    ],
)
def test_fields_that_are_not_text_are_refused(small, field, value, words):
    """Refused before any template runs: the same for the small vocabulary's template and GLM-4's published one."""
    with pytest.raises(ChatTemplateError, match=re.escape(words)):
        small.apply_chat_template([{"role": "user", "content": "hi", field: value}])


def test_a_nesting_bomb_is_refused_without_recursing(small):
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ChatTemplateError, match="nested more than"):
        small.apply_chat_template([{"role": "user", "content": "hi", "tools": deep}])


def test_str_subclasses_render_as_their_text_not_their_str(small):
    ids = small.apply_chat_template([{"role": "user", "content": SneakyStr("hello")}])
    assert ids == small.apply_chat_template([{"role": "user", "content": "hello"}])
    assert small.special_token_id("<|assistant|>") not in ids


def test_text_parts_are_joined(small):
    parts = [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo<|user|>"}]
    assert small.apply_chat_template([{"role": "user", "content": parts}]) == small.apply_chat_template(
        [{"role": "user", "content": "hello<|user|>"}]
    )


def test_mappings_and_tuples_are_accepted_as_json_data(small):
    message = OrderedDict(role="user", content="hi", tools=({"type": "function", "function": {"name": "f"}},))
    assert small.apply_chat_template([message]) == small.apply_chat_template(
        [{"role": "user", "content": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]}]
    )


# ---- properties -------------------------------------------------------------------------------------------
SPECIAL_TEXT = st.sampled_from(GLM4_SPECIAL_TOKENS)
TEXT = st.lists(st.one_of(st.text(max_size=12), SPECIAL_TEXT), max_size=5).map("".join)
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), TEXT)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=8,
)
NOT_JSON = st.one_of(
    st.binary(max_size=8),
    st.frozensets(TEXT, max_size=2),
    st.just(Sneaky()),
    st.just(float("nan")),
    st.complex_numbers(allow_nan=False),
)
TOOL = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["function", "python", "other"]),
        "function": st.fixed_dictionaries({"name": TEXT}, optional={"parameters": JSON}),
    }
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(ROLES), TEXT)},
    optional={
        "content": st.one_of(
            TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=3), JSON, NOT_JSON
        ),
        "metadata": st.one_of(TEXT, JSON, NOT_JSON),
        "tools": st.one_of(st.lists(TOOL, max_size=2), JSON, NOT_JSON),
        "extra": st.one_of(JSON, NOT_JSON),
    },
)
MESSAGES = st.lists(MESSAGE, max_size=4)
SPECIALS = re.compile("|".join(map(re.escape, sorted(GLM4_SPECIAL_TOKENS, key=len, reverse=True))))


def defang(value):
    """The same data with every piece of special-token text replaced by text of no consequence."""
    if isinstance(value, str):
        return SPECIALS.sub("@", value)
    if isinstance(value, dict):
        return {defang(key): defang(item) for key, item in value.items()}
    if isinstance(value, list):
        return [defang(item) for item in value]
    return value


def check_conversation(tokenizer: GLM4Tokenizer, messages, add_generation_prompt: bool):
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except ChatTemplateError:
        return
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert tokenizer.decode(ids) == text
    plain = tokenizer.apply_chat_template(defang(messages), add_generation_prompt=add_generation_prompt)
    assert [i for i in ids if tokenizer.is_special(i)] == [i for i in plain if tokenizer.is_special(i)]


@PROPERTY
@given(messages=MESSAGES, add_generation_prompt=st.booleans())
def test_arbitrary_messages_give_ids_or_a_chat_template_error_and_user_text_stays_text(
    small, messages, add_generation_prompt
):
    check_conversation(small, messages, add_generation_prompt)


@PROPERTY
@given(messages=MESSAGES, add_generation_prompt=st.booleans())
def test_the_same_holds_for_glm4s_published_template(published_template, messages, add_generation_prompt):
    check_conversation(published_template, messages, add_generation_prompt)


ANY_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=200)


@PROPERTY
@given(text=st.one_of(ANY_TEXT, st.lists(st.one_of(ANY_TEXT, SPECIAL_TEXT), max_size=6).map("".join)))
def test_encode_decode_round_trips_and_never_yields_a_special_id(small, text):
    ids = small.encode(text, add_special_tokens=False)
    assert small.decode(ids) == text
    assert not any(small.is_special(i) for i in ids)
    batch = small([text, text + "<|user|>"])["input_ids"]
    assert all(small.is_special(i) == (j < 2) for row in batch for j, i in enumerate(row))  # only the prefix
