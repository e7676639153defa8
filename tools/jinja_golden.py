#!/usr/bin/env python3
"""Renders the Jinja test templates with Jinja2 configured as transformers configures it for chat
templates (trim_blocks, lstrip_blocks, loopcontrols, raise_exception, a tojson that keeps
non-ASCII) and writes tests/data/jinja_golden.json: the reference vkvlm's interpreter is tested
against. Run it where Jinja2 is installed; the test suite itself needs only the JSON."""
import json
import os
import sys

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def environment():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture? Ünïcødé 你好"}]},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "And the colour?"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}]

CASES = [
    ("text_and_output", "Hello {{ name }}!", {"name": "wörld"}),
    ("whitespace_control", "a  {%- if x %} b {% endif -%}  c\n{{- ' d ' -}}\n e", {"x": True}),
    ("trim_and_lstrip_blocks", "line1\n    {% if x %}\n    inner\n    {% endif %}\nline2\n{# comment #}\nend", {"x": True}),
    ("plus_disables_lstrip", "x\n    {%+ if true %}y{% endif %}", {}),
    ("for_loop_variables", "{% for m in items %}{{ loop.index }}/{{ loop.length }}:{{ m }}{% if loop.first %}F{% endif %}{% if loop.last %}L{% endif %}{{ loop.revindex0 }}|{% endfor %}", {"items": ["a", "b", "c"]}),
    ("for_else_and_filter", "{% for x in items if x > 1 %}{{ x }},{% else %}empty{% endfor %}|{% for x in [] %}no{% else %}empty{% endfor %}", {"items": [1, 2, 3]}),
    ("loop_controls", "{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}{% if i == 5 %}{% break %}{% endif %}{{ i }}{% endfor %}", {}),
    ("tuple_unpack", "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% set a, b = [1, 2] %}{{ a + b }}", {"d": {"x": 1, "y": "z"}}),
    ("namespace_across_loop", "{% set ns = namespace(found=false, n=0) %}{% for m in msgs %}{% if m.role == 'system' %}{% set ns.found = true %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.found }} {{ ns.n }}", {"msgs": CONVERSATION}),
    ("set_does_not_leak_from_loop", "{% set x = 1 %}{% for i in [1,2] %}{% set x = i * 10 %}{{ x }}{% endfor %}{{ x }}", {}),
    ("macro_with_defaults", "{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('a') }} {{ greet('b', '?') }} {{ greet(name='c', punct='.') }}", {}),
    ("filters_strings", "{{ '  pad  ' | trim }}|{{ 'Mixed Case' | upper }}|{{ 'Mixed Case' | lower }}|{{ 'hello world' | title }}|{{ 'abc' | capitalize }}|{{ 'a-b-c' | replace('-', '+') }}|{{ 'héllo' | length }}", {}),
    ("filters_lists", "{{ items | length }}|{{ items | first }}|{{ items | last }}|{{ items | join(', ') }}|{{ items | reverse | list }}|{{ [3,1,2] | sort }}|{{ [1,1,2] | unique | list }}|{{ [1,2,3] | sum }}|{{ [4,2,8] | min }}{{ [4,2,8] | max }}", {"items": ["x", "y", "z"]}),
    ("filters_select_map", "{{ msgs | selectattr('role', 'equalto', 'user') | list | length }}|{{ msgs | rejectattr('role', 'equalto', 'user') | map(attribute='role') | join(',') }}|{{ [1,2,3,4] | select('even') | list }}|{{ [1,2,3,4] | reject('odd') | list }}|{{ ['a','b'] | map('upper') | join }}", {"msgs": CONVERSATION}),
    ("default_filter", "{{ missing | default('dflt') }}|{{ '' | default('empty', true) }}|{{ none_value | default('x') }}|{{ 0 | d(5) }}", {"none_value": None}),
    ("tojson", "{{ tools | tojson }}\n{{ {'a': [1, 2.5, true, none], 'ü': 'é\"\\n'} | tojson }}\n{{ tools[0] | tojson(indent=4) }}", {"tools": TOOLS}),
    ("tests", "{{ x is defined }}{{ y is defined }}{{ y is undefined }}{{ n is none }}{{ s is string }}{{ l is string }}{{ d is mapping }}{{ 3 is odd }}{{ 4 is even }}{{ 6 is divisibleby 3 }}{{ s is not none }}{{ 'a' is in 'cat' }}{{ 5 is number }}{{ 5 is integer }}{{ 2.5 is float }}", {"x": 1, "n": None, "s": "str", "l": [1], "d": {}}),
    ("operators", "{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 'a' ~ 1 ~ none }} {{ 'ab' * 3 }} {{ 1 + 2 * 3 - 4 }} {{ (1 + 2) * 3 }} {{ not true }} {{ 1 < 2 and 3 > 2 or false }} {{ 'x' in ['x'] }} {{ 'z' not in 'abc' }} {{ [1] + [2] }}", {}),
    ("conditional_expression", "{{ 'yes' if flag else 'no' }} {{ 'a' if not flag }}|{{ 'x' if flag else 'y' if other else 'z' }}", {"flag": False, "other": False}),
    ("slicing", "{{ s[1:3] }}|{{ s[::-1] }}|{{ l[-1] }}|{{ l[:2] }}|{{ l[1:] }}|{{ s[-2:] }}|{{ msgs[1:] | length }}", {"s": "héllo", "l": [1, 2, 3], "msgs": CONVERSATION}),
    ("string_methods", "{{ '  x  '.strip() }}|{{ 'a,b'.split(',') }}|{{ 'abc'.startswith('ab') }}{{ 'abc'.endswith('bc') }}|{{ 'Hi'.upper() }}{{ 'Hi'.lower() }}|{{ 'a b c'.split() }}|{{ 'xxhixx'.lstrip('x') }}{{ 'xxhixx'.rstrip('x') }}|{{ 'ab'.replace('a', 'z') }}|{{ ', '.join(['1', '2']) }}", {}),
    ("dict_access", "{{ d.a }} {{ d['b'] }} {{ d.get('c', 'dflt') }} {{ d.missing }}|{% for k in d %}{{ k }}{% endfor %}|{{ d.keys() | list }}|{{ d['nested']['x'] }}", {"d": {"a": 1, "b": "two", "nested": {"x": "deep"}}}),
    ("output_python_repr", "{{ [1, 'a', none, true, 2.0] }} {{ {'k': 'v'} }} {{ 1.5 }} {{ 10 / 4 }} {{ 1e20 }} {{ 0.0001 }} {{ 1e-05 }}", {}),
    ("filter_block_and_set_block", "{% filter upper %}shout {{ x }}{% endfilter %}|{% set block %}inner {{ x }}{% endset %}{{ block | trim }}", {"x": "it"}),
    ("raise_exception", "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with the user') }}{% endif %}", {"messages": CONVERSATION}),
    ("undefined_in_arithmetic", "{{ nothing + 1 }}", {}),
    ("llama3_style", "{{- bos_token }}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n    {%- if message['content'] is string %}\n        {{- message['content'] | trim }}\n    {%- else %}\n        {%- for content in message['content'] %}\n            {%- if content['type'] == 'image' %}\n                {{- '<|image|>' }}\n            {%- elif content['type'] == 'text' %}\n                {{- content['text'] | trim }}\n            {%- endif %}\n        {%- endfor %}\n    {%- endif %}\n    {{- '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n", {"messages": CONVERSATION, "bos_token": "<|begin_of_text|>", "add_generation_prompt": True}),
    ("qwen2_vl_style", "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", {"messages": CONVERSATION, "add_generation_prompt": True, "add_vision_id": True}),
    ("mistral_style", "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n            {{- ' [INST] ' + system_message + '\\n\\n' + (message['content'] if message['content'] is string else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ')) + ' [/INST]' }}\n        {%- else %}\n            {{- ' [INST] ' + (message['content'] if message['content'] is string else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ')) + ' [/INST]' }}\n        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n", {"messages": CONVERSATION, "bos_token": "<s>", "eos_token": "</s>"}),
    ("tools_json_style", "{%- if tools %}<tools>\n{%- for tool in tools %}\n{{ tool | tojson }}\n{%- endfor %}\n</tools>\n{%- endif %}\n{%- for message in messages %}{{ message.role }}: {{ message.content if message.content is string else message.content | map(attribute='type') | join('+') }}\n{%- endfor %}", {"messages": CONVERSATION, "tools": TOOLS}),
    ("indent_and_center", "{{ 'a\\nb\\nc' | indent(2) }}|{{ 'a\\nb' | indent(3, true) }}|{{ 'x' | center(5) }}|", {}),
    ("int_float_round", "{{ '42' | int + 1 }} {{ 3.7 | int }} {{ '2.5' | float * 2 }} {{ 3.14159 | round(2) }} {{ -3 | abs }} {{ 7 | string ~ '!' }}", {}),
    ("is_tests_with_comparison_args", "{{ 3 is gt 2 }}{{ 3 is lt 2 }}{{ 'a' is eq 'a' }}{{ 2 is ge 2 }}{{ 3 is ne 3 }}", {}),
    ("nested_loops_and_loop_previtem", "{% for row in [[1,2],[3]] %}{% for x in row %}{{ loop.index0 }}{{ x }}{% if loop.previtem is defined %}p{{ loop.previtem }}{% endif %} {% endfor %};{% endfor %}{% for c in 'ab' %}{{ loop.cycle('odd', 'even') }}{% endfor %}", {}),
    ("comments_and_raw", "a{# a comment {{ not rendered }} #}b{% raw %}{{ kept }}{% endraw %}c", {}),
]


def main():
    env = environment()
    out = []
    for name, source, variables in CASES:
        case = {"name": name, "template": source, "variables": variables}
        try:
            case["expected"] = env.from_string(source).render(**variables)
        except Exception as e:  # the interpreter must fail too
            case["error"] = f"{type(e).__name__}: {e}"
        out.append(case)
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "jinja_golden.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"reference": f"jinja2 {jinja2.__version__}", "cases": out}, f, ensure_ascii=False, indent=1)
    print(f"wrote {len(out)} cases to {os.path.normpath(path)}", file=sys.stderr)


if __name__ == "__main__":
    main()
