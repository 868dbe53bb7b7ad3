"""The server's answer building, without a server: OpenAI <-> GLM-4 messages, tool-call parsing on GLM-4-format
tokens (GLM-4's real vocabulary and template where ../shared has them), stop strings, leading whitespace."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CHAT_REFERENCE, requires_reference
from paddle_glm4 import GLM4Tokenizer
from paddle_glm4.server.errors import APIError
from paddle_glm4.server.reply import Reply
from paddle_glm4.server.schemas import ChatCompletionRequest
from paddle_glm4.server.tool_calls import active_tools, to_glm_messages
from paddle_glm4.small_vocab import write_small_vocabulary

needs_reference = requires_reference("tokenizer.model", "tokenizer_config.json")
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> GLM4Tokenizer:
    return GLM4Tokenizer.from_pretrained(write_small_vocabulary(tmp_path_factory.mktemp("vocab")))


@pytest.fixture(scope="module")
def real() -> GLM4Tokenizer:
    return GLM4Tokenizer.from_pretrained(CHAT_REFERENCE)


def answer_ids(tokenizer, *parts: str) -> list[int]:
    """Ids of an answer given as text with special tokens, e.g. ("get_weather\\n{}", "<|observation|>")."""
    ids = []
    for part in parts:
        if part in tokenizer.special_tokens:
            ids.append(tokenizer.special_token_id(part))
        else:
            ids.extend(tokenizer.encode(part, add_special_tokens=False))
    return ids


def run(reply: Reply, ids: list[int]) -> tuple[list[str], str]:
    """(the pieces released while generating, the rest released at the end)."""
    pieces = [reply.add(i) for i in ids]
    return [p for p in pieces if p], reply.finish()


def chat_reply(tokenizer, tools=(WEATHER_TOOL, TIME_TOOL), **options) -> Reply:
    return Reply(
        tokenizer,
        tokenizer.stop_token_ids,
        tool_names=[t["function"]["name"] for t in tools],
        strip_leading=True,
        **options,
    )


# ---- tool calls -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocabulary", ["small", pytest.param("real", marks=needs_reference)])
def test_a_glm4_tool_call_becomes_an_openai_tool_call(vocabulary, request):
    tokenizer = request.getfixturevalue(vocabulary)
    reply = chat_reply(tokenizer)
    released, rest = run(reply, answer_ids(tokenizer, 'get_weather\n{"city": "北京"}', "<|observation|>"))
    assert released == [] and rest == ""  # held back until it is known to be a call
    (call,) = reply.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "北京"}
    assert call.id.startswith("call_") and reply.finish_reason == "tool_calls" and reply.tokens > 3


@pytest.mark.parametrize("vocabulary", ["small", pytest.param("real", marks=needs_reference)])
def test_a_plain_answer_streams_as_it_comes(vocabulary, request):
    tokenizer = request.getfixturevalue(vocabulary)
    reply = chat_reply(tokenizer)
    released, rest = run(reply, answer_ids(tokenizer, "\n北京今天晴，20 度。", "<|user|>"))
    assert len(released) > 1 and "".join(released) + rest == "北京今天晴，20 度。"
    assert not reply.tool_calls and reply.finish_reason == "stop"


def test_several_calls_in_one_answer(small):
    reply = chat_reply(small)
    run(reply, answer_ids(small, 'get_weather\n{"city": "Paris"}', "<|assistant|>", "get_time\n{}", "<|observation|>"))
    assert [(c.function.name, json.loads(c.function.arguments)) for c in reply.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert len({c.id for c in reply.tool_calls}) == 2


@pytest.mark.parametrize(
    "answer",
    [
        "get_weather\nnot JSON at all",
        'get_weather\n{"city": "Paris"',  # cut short (max_tokens)
        'get_weather\n["Paris"]',  # JSON, but arguments are an object
        'send_email\n{"to": "x"}',  # a function that was not offered
        "get_weather",  # a name and nothing else
    ],
)
def test_a_malformed_call_comes_back_as_text(small, answer):
    reply = chat_reply(small)
    released, rest = run(reply, answer_ids(small, answer, "<|observation|>"))
    assert "".join(released) + rest == answer and not reply.tool_calls and reply.finish_reason == "stop"


def test_without_tools_nothing_is_parsed(small):
    reply = Reply(small, small.stop_token_ids, strip_leading=True)
    released, rest = run(reply, answer_ids(small, 'get_weather\n{"city": "Paris"}', "<|user|>"))
    assert "".join(released) + rest == 'get_weather\n{"city": "Paris"}' and not reply.tool_calls


# ---- text -----------------------------------------------------------------------------------------------
def test_finish_reasons_and_padding_ids(small):
    reply = Reply(small, small.stop_token_ids)
    _, _ = run(reply, [*answer_ids(small, "abc"), small.vocab_size + 3])  # a padding row of the embedding
    assert reply.text == "abc" and reply.finish_reason == "length" and reply.tokens == 4
    reply = Reply(small, small.stop_token_ids)
    run(reply, answer_ids(small, "abc", "<|endoftext|>"))
    assert reply.finish_reason == "stop"


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet="ab \n你", max_size=30),
    stop=st.text(alphabet="ab \n你", min_size=1, max_size=4),
    strip=st.booleans(),
)
def test_a_stop_string_cuts_the_text_and_nothing_past_the_cut_is_sent(small, text, stop, strip):
    expected = text[: text.index(stop)] if stop in text else text
    expected = expected.lstrip() if strip else expected
    reply = Reply(small, small.stop_token_ids, stop=[stop, "never there"], strip_leading=strip)
    sent = ""
    for token in small.encode(text, add_special_tokens=False):
        sent += reply.add(token)
        assert expected.startswith(sent)
    assert sent + reply.finish() == expected
    assert reply.stopped == (stop in text) and reply.finish_reason == ("stop" if stop in text else "length")


def test_the_first_stop_string_to_appear_ends_the_answer(small):
    reply = Reply(small, small.stop_token_ids, stop=["b b", "a\n"])
    released, rest = run(reply, answer_ids(small, "xa\nb b"))
    assert "".join(released) + rest == "x"


# ---- messages -------------------------------------------------------------------------------------------
def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_openai_messages_become_glm4_turns():
    body = request(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
        ],
        tools=[WEATHER_TOOL],
    )
    assert to_glm_messages(body.messages, active_tools(body.tools, body.tool_choice)) == [
        {"role": "system", "content": "", "tools": [WEATHER_TOOL]},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
        {"role": "observation", "content": '{"sky": "clear"}'},
    ]


def test_tool_choice_selects_the_tools_shown():
    def shown(choice):
        body = request(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice)
        return [tool.function.name for tool in active_tools(body.tools, body.tool_choice)]

    assert shown("none") == []
    assert shown("auto") == shown("required") == shown(None) == ["get_weather", "get_time"]
    assert shown({"type": "function", "function": {"name": "get_time"}}) == ["get_time"]
    with pytest.raises(APIError) as caught:
        shown({"type": "function", "function": {"name": "nope"}})
    assert caught.value.status == 400


@needs_reference
def test_a_round_trip_renders_in_glm4s_published_format(real):
    body = request(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Beijing?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c", "content": '{"temperature": 20}'},
        ],
        tools=[WEATHER_TOOL],
    )
    messages = to_glm_messages(body.messages, active_tools(body.tools, body.tool_choice))
    text = real.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    tool_block = json.dumps(WEATHER_TOOL["function"], ensure_ascii=False, indent=4)
    assert text.startswith("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。")
    assert (
        f"# 可用工具\n## get_weather\n\n{tool_block}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
        "<|system|>\nBe brief." in text
    )
    assert text.endswith(
        "<|system|>\nBe brief.<|user|>\nWeather in Beijing?<|assistant|>get_weather\n"
        '{"city": "Beijing"}<|observation|>\n{"temperature": 20}<|assistant|>'
    )
    ids = real.apply_chat_template(messages, add_generation_prompt=True)
    assert ids.count(real.special_token_id("<|observation|>")) == 1
    assert ids[-1] == real.special_token_id("<|assistant|>")
