#!/usr/bin/env python3
"""Renders the Jinja test templates with Jinja2 configured as transformers configures it for chat
templates (immutable sandbox, trim_blocks, lstrip_blocks, loopcontrols, {% generation %},
raise_exception, strftime_now, a tojson that keeps non-ASCII; tools and documents passed as None
when absent) and writes tests/data/jinja_golden.json: the reference vkvlm's interpreter is tested
against. Besides the construct cases below, every real chat template in
tests/data/chat_templates/ is rendered for every conversation in CONVERSATIONS, and the model
folders in MODEL_FOLDERS by transformers' own apply_chat_template ("model_cases"). Run it where
Jinja2 and transformers are installed (e.g. the HF reference environment, PYTHONPATH set); the
test suite itself needs only the JSON."""
import json
import os
import sys

from datetime import datetime

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class Generation(Extension):
    """{% generation %}...{% endgeneration %}: renders its body (transformers only records where)."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body", []), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def environment():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, Generation])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
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
    # Jinja2's select/reject/map filters give an empty sequence for a falsy value (Functionary
    # v3.1 filters `tools`, None when absent); their arguments are not read then.
    ("filters_on_none", "[{{ none | selectattr('type', 'equalto', 'function') | list }}|{{ none | rejectattr('x') | list }}|{{ none | select('odd') | list }}|{{ none | reject | list }}|{{ none | map(attribute='name') | list }}|{{ tools | selectattr('type', 'equalto', 'function') | list | length }}|{{ undefined_thing | map('upper') | join }}|{{ [] | map('nonexistent_filter') | list }}]", {"tools": None}),
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
    # Constructs real templates use, each once found rendering differently from Jinja2.
    ("lstrip_after_trimmed_newline", "{% if true %}\n    {% if true %}B{% endif %}\n{% endif %}", {}),
    ("lstrip_after_trimmed_newline_in_loop", "<a>\n{% for x in [1, 2] %}\n    {% if x %}{{ x }}{% endif %}\n{% endfor %}\n</a>", {}),
    ("minus_stops_at_comments", "a {# c #} {%- if true %}x{% endif %} {# d #}  \n{{- 'y' }}", {}),
    ("minus_comment_markers", "a  {#- c -#}  b", {}),
    ("dictsort", "{% for k, v in d | dictsort %}{{ k }}={{ v }};{% endfor %}|{% for k, v in d | dictsort(reverse=true) %}{{ k }}{% endfor %}|{{ d | dictsort(by='value') }}", {"d": {"b": 2, "a": 3, "C": 1}}),
    ("str_format", "{{ '{}-{}'.format(1, 'x') }}|{{ '{0}{1}{0}'.format('a', 'b') }}|{{ '{name}!'.format(name='n') }}|{{ '{{}}{}'.format(5) }}", {}),
    ("dict_literal_non_string_keys", "{% set d = {1: 'one', true: 'yes', none: 'nothing'} %}{{ d[1] }} {{ d[true] }} {{ d[none] }} {{ d | length }}", {}),
    ("in_undefined", "{{ 'x' in missing }}|{{ 'x' not in missing }}", {}),
    ("string_filters_on_non_strings", "{{ 42 | trim }}|{{ 3.5 | upper }}|{{ none | lower }}|{{ [1, 2] | trim }}|{{ 12 | replace('1', 'x') }}|{{ true | title }}", {}),
    ("safe_markup_escapes_what_is_added", "{{ ('<b>' | safe) + '<i>' }}|{{ '<b>' ~ ('<i>' | safe) }}|{{ ('<x>' | safe) | length }}", {}),
    ("iterate_none_raises", "{% for x in nothing %}{{ x }}{% endfor %}", {"nothing": None}),
    ("tojson_of_a_generator_raises", "{{ [1, 2] | map('string') | tojson }}", {}),
    ("str_format_specs", "{{ '[{:>6}|{:<4}|{:^7}|{:05d}|{:.2f}|{:,}|{:+d}|{:.1%}|{!r}|{x[a]}|{:e}|{:g}|{}]'.format('ab', 'c', 'mid', 42, 3.14159, 1234567, 5, 0.25, 'q', 1.5e-7, 2.5, 0.1, x={'a': 1}) }}|{{ '{0:*^9}{1[0]}{0!s}'.format('m', [7]) }}", {}),
    ("str_format_unbalanced_raises", "{{ 'a}b'.format() }}", {}),
    ("generators_are_true_lists_by_content", "{{ 'T' if [] | select else 'F' }}{{ 'T' if [] | select | list else 'F' }}{{ 'T' if [] | reverse else 'F' }}", {}),
    ("generator_is_used_up_by_one_loop", "{% set g = [1, 2, 3] | map('string') %}{% for x in g %}{{ x }}{% endfor %}|{% for x in g %}{{ x }}{% endfor %}|{{ g | list }}", {}),
    ("length_of_a_generator_raises", "{{ [1, 2] | select | length }}", {}),
    ("tuples_and_dict_views_print_as_python", "{{ (1, 'a') }} {{ (1,) }} {{ () }} {{ {'a': 1}.items() }} {{ {'a': 1}.keys() }} {{ {'a': 1}.values() }} {{ {'a': 1}.items() | list }}", {}),
    ("dict_keys_of_every_kind", "{% set d = {1.0: 'f', 2: 'two', 'k': none} %}{{ d }}|{{ d[1] }}|{{ d | tojson }}|{{ 2 in d }}|{{ d.get(2.0) }}|{% for k in d %}{{ k }},{% endfor %}", {}),
    ("unhashable_key_raises", "{% set d = {[1]: 2} %}", {}),
    ("sort_ignores_case_unless_asked", "{{ ['b', 'A', 'a', 'C'] | sort }}|{{ ['b', 'A', 'a', 'C'] | sort(case_sensitive=true) }}|{{ {'b': 1, 'A': 2} | dictsort(true) }}", {}),
    ("escape_and_safe", "{{ '<a href=\"x\">' | e }}|{{ ('<b>' | safe) | e }}|{{ ('<b>' | e) + '<' }}|{{ ('%s' | safe) * 2 }}|{{ ('<{}>' | safe).format('&') }}", {}),
    ("indent_splits_lines_as_python", "{{ 'a\r\nb\n\nc' | indent(2) }}|{{ 'x\ny' | indent('> ', true) }}|{{ 'x\n\ny' | indent(1, blank=true) }}", {}),
    ("center_pads_as_cpython", "[{{ 'ab' | center(5) }}][{{ 'abc' | center(6) }}][{{ 'a' | center(4) }}]", {}),
    ("crlf_source_and_trailing_newline", "a\r\n{% if true %}\r\nb\r{{ 'x\r\ny' }}{% endif %}\n", {}),
    ("raw_keeps_its_newline", "{% raw %}\n{{ x }}{% endraw %}\nY|{% raw -%}\n  Z\n  {% endraw %}\n.", {}),
    ("items_of_undefined_is_empty", "{% for k, v in missing | items %}x{% endfor %}.", {}),
    # Strings by character, not byte; long needles (another search path) found as short ones are.
    ("string_indexing_and_slices_by_character", "{{ s[0] }}{{ s[-1] }}{{ s[2] }}|{{ s[1:4] }}|{{ s[::-1] }}|{{ s[::2] }}|{{ s[-2:] }}|{{ s[5:1:-2] }}|{{ s[:-100] }}|{{ s[100:] }}|{{ s | reverse }}|{{ s | length }}|{{ s.find('ü') }}|{{ s.count('') }}|{{ [s[9]] }}|{% for c in s[:3] %}<{{ c }}>{% endfor %}", {"s": "añb€cüd你e"}),
    ("long_needles", "{{ n in h }}|{{ (n ~ 'x') in h }}|{{ h.find(n) }}|{{ h.count(n) }}|{{ h.replace(n, '+') }}|{{ h.split(n) }}|{{ h.find(n ~ 'x') }}", {"n": "ab" * 20 + "c", "h": "ab" * 30 + "c-" + "ab" * 20 + "c" + "ab" * 20 + "c"}),
    ("unique_ignores_case_unless_asked", "{{ ['a', 'A', 'b', 'a'] | unique | list }}|{{ ['a', 'A', 'b'] | unique(case_sensitive=true) | list }}|{{ [{'n': 'X'}, {'n': 'x'}, {'n': 'y'}] | unique(attribute='n') | list }}|{{ [1, true, 1.0, 2] | unique | list }}", {}),
    ("unique_of_unhashable_raises", "{{ [[1], [1]] | unique | list }}", {}),
    ("wordcount_and_center_by_character", "{{ '  one two\tthree\n four ' | wordcount }}|[{{ 'ü' | center(4) }}]|{{ '{:.2}|{:>4}'.format('äöü', 'é') }}", {}),
]

# Conversations every real template is rendered with (as transformers passes them).
TOOLS_REAL = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                                                 "parameters": {"type": "object", "properties": {
                                                     "city": {"type": "string", "description": "The city"},
                                                     "unit": {"type": "string", "enum": ["c", "f"]}},
                                                     "required": ["city"]}}}]
CONVERSATIONS = {
    "chat": ([{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi there"},
              {"role": "assistant", "content": "Hello! How can I help?"},
              {"role": "user", "content": "Tell me a joke. Ünïcødé 你好"}], None, True),
    "no_system_no_generation_prompt": ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], None, False),
    "image_parts": ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}], None, True),
    "tools": ([{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]},
               {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temp\": 21}"},
               {"role": "assistant", "content": "It is 21 degrees in Paris."},
               {"role": "user", "content": "Thanks!"}], TOOLS_REAL, True),
    "documents": ([{"role": "user", "content": "What do the notes say?"}], None, True,
                  [{"title": "Note 1", "text": "Paris is sunny."}, {"title": "Note 2", "text": "Rome is <rainy> & \"cold\"."}]),
}
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def real_template_cases():
    folder = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "chat_templates")
    cases = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".jinja"):
            continue
        for conv, (messages, tools, gen, *documents) in CONVERSATIONS.items():
            variables = dict(SPECIAL_TOKENS, messages=messages, tools=tools, documents=documents[0] if documents else None,
                             add_generation_prompt=gen)
            cases.append((f"{name[:-6]}/{conv}", name, variables))
    return cases


# Model folders whose own chat template transformers' apply_chat_template renders (what
# `vkvlm render-template --model DIR` must print): the processor's template where the folder has
# chat_template.json, else the tokenizer's.
MODEL_FOLDERS = ["fixtures/llava15-f16", "fixtures/llavanext-bf16-legacy", "fixtures/phi3v-bf16", "fixtures/qwen2vl-bf16",
                 "derived/qwen2vl-mlx4-2024", "../../models/shapes-llava"]


class FolderTokenizer:
    """A model folder's tokenizer_config.json as transformers' tokenizer holds it (chat_template,
    special tokens), without a vocabulary: apply_chat_template needs no more."""

    @staticmethod
    def load(path):
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase

        class Tokenizer(PreTrainedTokenizerBase):
            pass

        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        config.pop("added_tokens_decoder", None)
        config.pop("tokenizer_class", None)
        if isinstance(config.get("chat_template"), list):  # named templates, as from_pretrained turns them
            config["chat_template"] = {t["name"]: t["template"] for t in config["chat_template"]}
        return Tokenizer(**config)


def model_cases(data):
    cases = []
    for folder in MODEL_FOLDERS:
        path = os.path.normpath(os.path.join(data, folder))
        tokenizer = FolderTokenizer.load(path)
        # A processor's chat_template.json wins over the tokenizer's (ProcessorMixin.apply_chat_template).
        processor_template = None
        if os.path.exists(os.path.join(path, "chat_template.json")):
            with open(os.path.join(path, "chat_template.json"), encoding="utf-8") as f:
                processor_template = json.load(f)["chat_template"]
        for conv, (messages, tools, gen, *documents) in CONVERSATIONS.items():
            if documents:
                continue
            case = {"name": f"{os.path.basename(path)}/{conv}", "model": folder, "messages": messages, "tools": tools,
                    "add_generation_prompt": gen}
            try:
                case["expected"] = tokenizer.apply_chat_template(messages, chat_template=processor_template, tools=tools,
                                                                 add_generation_prompt=gen, tokenize=False)
            except Exception as e:
                case["error"] = f"{type(e).__name__}: {e}"
            cases.append(case)
    return cases


def render(env, source, variables, case):
    try:
        case["expected"] = env.from_string(source).render(**variables)
    except Exception as e:  # the interpreter must fail too
        case["error"] = f"{type(e).__name__}: {e}"
    return case


def main():
    env = environment()
    out = []
    for name, source, variables in CASES:
        out.append(render(env, source, variables, {"name": name, "template": source, "variables": variables}))
    folder = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "chat_templates")
    for name, file, variables in real_template_cases():
        with open(os.path.join(folder, file), encoding="utf-8") as f:
            source = f.read()
        out.append(render(env, source, variables, {"name": name, "template_file": file, "variables": variables}))
    data = os.path.join(os.path.dirname(__file__), "..", "tests", "data")
    import transformers
    models = model_cases(data)
    path = os.path.join(data, "jinja_golden.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"reference": f"jinja2 {jinja2.__version__}, transformers {transformers.__version__}", "cases": out,
                   "model_cases": models}, f, ensure_ascii=False, indent=1)
    print(f"wrote {len(out)} cases to {os.path.normpath(path)}", file=sys.stderr)


if __name__ == "__main__":
    main()
