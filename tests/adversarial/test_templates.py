"""Adversarial: a chat template is code that comes with a downloaded model (tokenizer_config.json).

It runs in Jinja's sandbox, and with limits: no other templates (import, include, extends), bounded strings,
lists and integers on the way, bounded output, bounded time. Every failure is a ChatTemplateError that names the
template's file, and the process is unharmed (its memory stays small; the next conversation renders).
"""

from __future__ import annotations

import json
import re
import resource
import time

import pytest

from paddle_glm4 import chat_template
from paddle_glm4.chat_template import ChatTemplateError
from paddle_glm4.small_vocab import write_small_vocabulary
from paddle_glm4.tokenizer import GLM4Tokenizer

HI = [{"role": "user", "content": "hi"}]

ATTACKS = {
    "include": "{% include 'secrets.txt' %}",
    "import": "{% import 'macros.j2' as m %}",
    "from-import": "{% from 'macros.j2' import m %}",
    "extends": "{% extends 'base.j2' %}",
    "repeat-string": "{{ 'x' * 10**9 }}",
    "repeat-string-reversed": "{{ 10**9 * 'x' }}",
    "repeat-list": "{{ ([1] * 1000000) * 1000 }}",
    "center": "{{ 'x' | center(1000000000) }}",
    "indent": "{{ 'x' | indent(1000000000) }}",
    "ljust-method": "{{ 'x'.ljust(1000000000) }}",
    "format-width": "{{ '{:>999999999}'.format('x') }}",
    "percent-width": "{{ '%999999999s' % 'x' }}",
    "percent-star": "{{ '%*s' % (999999999, 'x') }}",
    "doubling-with-tilde": "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s | length }}",
    "doubling-with-plus": "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}{{ ns.s | length }}",
    "squaring-with-replace": "{% set ns = namespace(s='x' * 3000) %}{% for i in range(5) %}"
    "{% set ns.s = ns.s | replace('x', ns.s) %}{% endfor %}{{ ns.s | length }}",
    "join-with-a-huge-separator": "{{ range(100000) | join('x' * 1000000) }}",
    "squaring-integers": "{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}"
    "{% endfor %}{{ ns.n }}",
    "tower-of-powers": "{{ (((9 ** 64) ** 64) ** 64) ** 64 }}",
    "huge-output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "endless-loop": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "python-internals": "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "syntax": "{% for %}",
    "undefined-call": "{{ nothing() }}",
    "division-by-zero": "{{ 1 / 0 }}",
    "raise-exception": "{{ raise_exception('no thanks') }}",
}


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return write_small_vocabulary(tmp_path_factory.mktemp("small"))


def with_template(small_dir, directory, template: str) -> GLM4Tokenizer:
    config = json.loads((small_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    (directory / "tokenizer.model").write_bytes((small_dir / "tokenizer.model").read_bytes())
    (directory / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": template}), encoding="utf-8"
    )
    return GLM4Tokenizer.from_pretrained(directory)


@pytest.mark.parametrize("template", ATTACKS.values(), ids=ATTACKS.keys())
def test_a_hostile_template_fails_with_a_chat_template_error_naming_it(small_dir, tmp_path, monkeypatch, template):
    monkeypatch.setattr(chat_template, "MAX_SECONDS", 1.0)  # the endless loop need not take the default 5 s
    tokenizer = with_template(small_dir, tmp_path, template)
    started = time.monotonic()
    with pytest.raises(ChatTemplateError) as caught:
        tokenizer.apply_chat_template(HI)
    assert str(tmp_path / "tokenizer_config.json") in str(caught.value)
    assert time.monotonic() - started < 10
    # no attack got to allocate much: the whole test process stays far below a gigabyte
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 3 * 1024 * 1024  # KiB


def test_the_limits_say_what_was_exceeded(small_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_SECONDS", 0.5)
    expected = {
        "include": "uses 'include' (line 1)",
        "endless-loop": "ran longer than 0.5 s",
        "huge-output": "output passed",
        "repeat-string": "would hold 1000000000 items",
        "recursion": "recursed too deeply",
        "raise-exception": "rejected the conversation: no thanks",
        "syntax": "is not a valid Jinja template",
        "python-internals": "SecurityError",
    }
    for name, words in expected.items():
        with pytest.raises(ChatTemplateError, match=re.escape(words)):
            with_template(small_dir, tmp_path, ATTACKS[name]).apply_chat_template(HI)


def test_ordinary_template_work_is_not_limited(small_dir, tmp_path):
    template = (
        "{{ 'ab' * 3 }}|{{ 2 ** 10 }}|{{ [1, 2] | join(',') }}|{{ 'x' | center(5) }}|{{ '{:>4}'.format(7) }}|"
        "{{ '%03d' % 5 }}|{{ 'a' ~ 'b' }}|{% for m in messages %}{{ m['content'] | replace('h', 'H') }}"
        "{% endfor %}|{{ messages | tojson }}"
    )
    text = with_template(small_dir, tmp_path, template).apply_chat_template(HI, tokenize=False)
    assert text == 'ababab|1024|1,2|  x  |   7|005|ab|Hi|[{"role": "user", "content": "hi"}]'


def test_a_failed_template_leaves_the_tokenizer_working(small_dir, tmp_path):
    bad = with_template(small_dir, tmp_path, ATTACKS["huge-output"])
    with pytest.raises(ChatTemplateError):
        bad.apply_chat_template(HI)
    good = GLM4Tokenizer.from_pretrained(small_dir)
    assert good.decode(good.apply_chat_template(HI)) == "[gMASK]<sop><|user|>\nhi"


def test_the_time_limit_does_not_disturb_a_debugger(small_dir, tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(chat_template, "MAX_SECONDS", 0.0)  # would stop any template at once
    tokenizer = GLM4Tokenizer.from_pretrained(small_dir)
    calls = []

    def tracer(frame, event, arg):
        calls.append(event)
        return None

    sys.settrace(tracer)
    try:
        assert tokenizer.apply_chat_template(HI, tokenize=False) == "[gMASK]<sop><|user|>\nhi"
    finally:
        sys.settrace(None)
    assert calls  # the caller's tracer kept running and was not replaced
    with pytest.raises(ChatTemplateError, match="ran longer than 0 s"):
        tokenizer.apply_chat_template(HI)
