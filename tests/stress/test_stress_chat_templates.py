"""Malicious chat templates (from a model file) end in a clear ChatTemplateError: sandbox
escapes, endless loops, huge outputs, runaway recursion."""
from __future__ import annotations

import time

import pytest

from mistralrs_core.tokenization import chat_template as ct
from mistralrs_core.tokenization.chat_template import ChatTemplate, ChatTemplateError

MESSAGES = [{"role": "user", "content": "hi"}]

ATTACKS = {
    # sandbox escapes
    "class walk": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals via cycler": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "namespace dunder": "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "format attribute walk": "{{ '{0.__class__}'.format(messages) }}",
    "mutating the messages": "{% set _ = messages.append(1) %}{{ messages }}",
    "attr filter escape": "{{ messages|attr('__class__') }}",
    # endless loops
    "nested ranges": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "nested ranges with output":
        "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
    "nested string loops": "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "runaway recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "recursive loop": "{% for m in [[1]] recursive %}{{ loop([m]) }}{% endfor %}",
    # huge outputs
    "string repetition": "{{ 'x' * 10000000000 }}",
    "list repetition": "{{ ([1] * 100000000)|length }}",
    "power": "{{ 10 ** 100000000 }}",
    "chained powers": "{{ 7 ** 1000 ** 1000 ** 1000 }}",
    "division by zero": "{{ 1 / 0 }}",
    "float overflow": "{{ 10.0 ** 1000 }}",
    "percent width": "{{ '%999999999s' % 'x' }}",
    "format width": "{{ '{:>999999999}'.format('x') }}",
    "ljust": "{{ 'x'.ljust(10000000000) }}",
    "center filter": "{{ 'x'|center(10000000000) }}",
    "indent filter": "{{ 'a\nb'|indent(10000000000) }}",
    "output doubling": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s }}",
    "long output": "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_malicious_template_is_stopped_with_a_clear_error(name, monkeypatch):
    monkeypatch.setattr(ct, "MAX_RENDER_SECONDS", 1.0)
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError, match="chat template"):
        ChatTemplate(ATTACKS[name], origin="chat template of evil.gguf").render(MESSAGES)
    assert time.monotonic() - t0 < 5


def test_real_templates_still_render():
    from mistralrs_core.testing.tiny import CHATML_TEMPLATE
    out = ChatTemplate(CHATML_TEMPLATE).render(MESSAGES * 200)
    assert out.count("<|im_start|>user") == 200
    loop = "{% for m in messages %}{{ m.content|center(20) }}{{ loop.index }}{% endfor %}"
    assert ChatTemplate(loop).render(MESSAGES) == "hi".center(20) + "1"
