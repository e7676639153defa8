// The chat-template interpreter against Jinja2 itself (tests/data/jinja_golden.json, made by
// tools/jinja_golden.py with transformers' settings) and against the prompt text the reference
// processors rendered for every fixture conversation.
#include <gtest/gtest.h>

#include <sys/resource.h>

#include <chrono>
#include <fstream>

#include <nlohmann/json.hpp>

#include "host/jinja.h"
#include "tests/expect_error.h"
#include "tests/test_paths.h"

namespace vkvlm::test {
namespace {

using jinja::Template;
using jinja::Value;

std::map<std::string, Value> vars_from(const nlohmann::ordered_json& j) {
  std::map<std::string, Value> v;
  for (auto& [k, x] : j.items()) v[k] = Value::from_json(x);
  return v;
}

TEST(Jinja, MatchesJinja2OnEveryGoldenCase) {
  std::ifstream in(test_data_dir() + "/jinja_golden.json");
  ASSERT_TRUE(in);
  auto golden = nlohmann::ordered_json::parse(in);
  ASSERT_GT(golden["cases"].size(), 140u);
  for (auto& c : golden["cases"]) {
    SCOPED_TRACE(c["name"].get<std::string>());
    std::string src;
    if (c.contains("template_file")) {
      // A real model's chat template (tests/data/chat_templates), for a whole conversation.
      std::ifstream f(test_data_dir() + "/chat_templates/" + c["template_file"].get<std::string>(), std::ios::binary);
      src.assign(std::istreambuf_iterator<char>(f), {});
    } else {
      src = c["template"].get<std::string>();
    }
    if (c.contains("error")) {
      EXPECT_ANY_THROW(Template(src, "t").render(vars_from(c["variables"]))) << "Jinja2 raised " << c["error"];
      continue;
    }
    std::string got;
    try {
      got = Template(src, "t").render(vars_from(c["variables"]));
    } catch (const std::exception& e) {
      ADD_FAILURE() << "threw: " << e.what();
      continue;
    }
    EXPECT_EQ(got, c["expected"].get<std::string>());
  }
}

TEST(Jinja, RaiseExceptionCarriesTheMessage) {
  try {
    Template("{{ raise_exception('roles must alternate') }}", "chat template").render({});
    FAIL();
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("roles must alternate"), std::string::npos) << e.what();
  }
}

TEST(Jinja, UnsupportedConstructsNameThemselvesAndTheirLine) {
  struct Case {
    const char* src;
    const char* construct;
    const char* line;
  };
  for (auto c : {Case{"ok\n{% include 'x.j2' %}", "include", "line 2"}, Case{"{{ x | frobnicate }}", "frobnicate", "line 1"},
                 Case{"a\nb\n{{ x is weird }}", "weird", "line 3"}, Case{"{% for x in y %}", "endfor", ""}}) {
    try {
      Template(c.src, "chat template").render({{"x", Value(1)}, {"y", Value(jinja::List{})}});
      ADD_FAILURE() << c.src << " should fail";
    } catch (const std::exception& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find(c.construct), std::string::npos) << m;
      EXPECT_NE(m.find(c.line), std::string::npos) << m;
      EXPECT_NE(m.find("chat template"), std::string::npos) << m;
    }
  }
}

TEST(Jinja, GenerationTagRendersItsBody) {
  EXPECT_EQ(Template("{% generation %}a{{ 1 }}{% endgeneration %}b", "t").render({}), "a1b");
}

// The fixture models' templates render each case's messages to exactly the reference prompt.
TEST(Jinja, FixtureChatTemplatesReproducePromptText) {
  int checked = 0;
  for (const char* model : {"llava15-f16", "llava15-mlx4", "llavanext-bf16-legacy", "phi3v-bf16", "phi3v-long-bf16"}) {
    const std::string dir = fixtures_dir() + "/" + model;
    std::ifstream tc(dir + "/tokenizer_config.json"), cs(dir + "/cases.json");
    ASSERT_TRUE(tc && cs) << model;
    auto cfg = nlohmann::json::parse(tc);
    auto cases = nlohmann::ordered_json::parse(cs);
    Template t(cfg["chat_template"].get<std::string>(), std::string(model) + " chat template");
    for (auto& c : cases["cases"]) {
      std::map<std::string, Value> v;
      v["messages"] = Value::from_json(c["messages"]);
      v["add_generation_prompt"] = Value(true);
      for (const char* k : {"bos_token", "eos_token", "unk_token", "pad_token"})
        if (cfg.contains(k) && cfg[k].is_string()) v[k] = Value(cfg[k].get<std::string>());
      EXPECT_EQ(t.render(v), c["prompt_text"].get<std::string>()) << model << " " << c["name"];
      ++checked;
    }
  }
  EXPECT_EQ(checked, 23);
}

// Templates a stranger wrote (each one a reproduction of a crash, a hang or a blow-up): every one
// fails with an error naming the limit it hit, and the process goes on.
TEST(Jinja, HostileTemplatesHitLimitsNotTheProcess) {
  auto render = [](const std::string& src, std::map<std::string, Value> vars = {}) {
    return Template(src, "chat template").render(vars);
  };
  const std::string deep_parens = "{{ " + std::string(100000, '(') + "1" + std::string(100000, ')') + " }}";
  const std::string deep_lists = "{{ " + std::string(100000, '[') + std::string(100000, ']') + " }}";
  std::string deep_ifs;
  for (int i = 0; i < 100000; ++i) deep_ifs += "{% if true %}";
  deep_ifs += "x";
  for (int i = 0; i < 100000; ++i) deep_ifs += "{% endif %}";
  expect_error([&] { render("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"); }, {"macro f", "64 calls deep"});
  expect_error([&] { render(deep_parens); }, {"nests deeper than 100 levels"});
  expect_error([&] { render(deep_lists); }, {"nests deeper than 100 levels"});
  expect_error([&] { render(deep_ifs); }, {"blocks nest deeper than 100 levels"});
  expect_error([&] { render("{{ (-9223372036854775807 - 1) // -1 }}"); }, {"integer overflow in //"});
  expect_error([&] { render("{{ 9223372036854775807 + 1 }}"); }, {"integer overflow in +"});
  expect_error([&] { render("{{ -9223372036854775807 - 10 }}"); }, {"integer overflow in -"});
  expect_error([&] { render("{{ 4611686018427387904 * 4 }}"); }, {"integer overflow in *"});
  expect_error([&] { render("{{ -(-9223372036854775807 - 1) }}"); }, {"integer overflow in unary -"});
  expect_error([&] { render("{{ 2 ** 1000000000000 }}"); }, {"integer overflow in **"});
  expect_error([&] { render("{{ (-9223372036854775807 - 1) | abs }}"); }, {"integer overflow in abs"});
  // Found by the fuzzer: a float past 64 bits made an integer (undefined behaviour before).
  expect_error([&] { render("{{ 3.141 | round(2) }}{{ 1e300 | int }}"); }, {"does not fit a 64-bit integer"});
  expect_error([&] { render("{{ range(1e30) }}"); }, {"does not fit a 64-bit integer"});
  EXPECT_EQ(render("{{ 2 ** 62 }} {{ (-1) ** 1000000000001 }} {{ 0 ** 0 }} {{ 7 % -3 }} {{ -7 // 2 }}"),
            "4611686018427387904 -1 1 -2 -4");
  expect_error([&] { render("{{ 'x' * 10000000000 }}"); }, {"string longer than 16 MiB"});
  expect_error([&] { render("{{ [1, 2] * 10000000000 }}"); }, {"list of more than 1048576 items"});
  expect_error([&] { render("{% for i in range(1000000) %}{% for j in range(1000000) %}{% endfor %}{% endfor %}"); },
               {"more than 1000000 steps"});
  expect_error([&] { render("{% for i in range(9223372036854775807) %}{% endfor %}"); }, {"range() of more than 1048576 items"});
  expect_error([&] { render("{% for i in range(20) %}{{ 'x' * 1000000 }}{% endfor %}"); }, {"rendered more than 16 MiB"});
  expect_error([&] { render("{% for i in range(1000000) %}{% set x = 'a' * 16000000 %}{% endfor %}"); }, {"more than 256 MiB"});
  expect_error([&] { render("{% set ns = namespace(x=[]) %}{% for i in range(1000) %}{% set ns.x = [ns.x] %}{% endfor %}"); },
               {"nested deeper than 200 levels"});
  expect_error([&] { render("{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}"); }, {"nested too deeply"});
  expect_error([&] { render("{% set l = [] %}{{ l.append(1) }}"); }, {"'append'", "unsafe"});
  expect_error([&] { render("{% set d = {} %}{{ d.update({'a': 1}) }}"); }, {"'update'", "unsafe"});
  // Input nested past the limit (a request's message content) is refused when it is read.
  std::string deep_json = std::string(1000, '[') + std::string(1000, ']');
  expect_error([&] { Value::from_json(nlohmann::json::parse(deep_json)); }, {"nested deeper than 200 levels"});
  // Cycles a template can build (a macro in the scope it captures, a namespace that holds
  // itself) are broken when the render ends: the sanitizer build's leak check fails otherwise.
  EXPECT_EQ(render("{% macro m(x) %}<{{ x }}>{% endmacro %}{% set ns = namespace(a=1) %}{% set ns.me = ns %}"
                   "{% set ns.l = [ns, m] %}{% set ns.f = m %}{{ ns.f(ns.a) }}{{ ns.me.me.a }}"),
            "<1>1");
  // And an ordinary template still renders.
  EXPECT_EQ(render("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }};{% endfor %}",
                   {{"messages", Value::from_json(nlohmann::json::parse(R"([{"role": "user", "content": "hi"}])"))}}),
            "user:hi;");
}

// A template costs what it holds and what it does: a long string copied into a list is held
// once, nothing is built past the string limit on the way to it, a search or comparison of
// long strings is linear and counts its bytes against the step budget, and |unique is linear.
TEST(Jinja, TemplatesCostWhatTheyHoldAndDo) {
  auto render = [](const std::string& src) { return Template(src, "chat template").render({}); };
  const std::string s = "{% set s = 'x' * 16000000 %}";
  EXPECT_EQ(render(s + "{{ ([s] * 1000) | length }}|{{ ([s] * 1000)[999] | length }}"), "1000|16000000");
  for (const char* build : {"{{ ([s] * 1000) | join }}", "{{ '-'.join([s] * 1000) }}", "{{ [s] * 1000 }}",
                            "{{ ([s] * 1000) | tojson }}", "{{ ([s] * 1000) ~ '' }}", "{{ {'k': [s] * 1000} }}",
                            "{{ s.replace('x', s) }}", "{{ s | replace('x', 'yy') }}", "{{ {'a': 1} | tojson(indent=100000000) }}"})
    expect_error([&] { render(s + build); }, {"string longer than 16 MiB"});
  // 'aaa…ab' in 'aaa…a' reads each byte once, whatever the call.
  const std::string h = "{% set h = 'a' * 8000000 %}{% set n = 'a' * 4000000 ~ 'b' %}";
  EXPECT_EQ(render(h + "{{ n in h }}|{{ h.find(n) }}|{{ h.count(n) }}|{{ h.replace(n, '') | length }}|{{ h.split(n) | length }}"),
            "False|-1|0|8000000|1");
  // ... and a loop of them, of comparisons, sorts or character indexing of long strings runs out of steps.
  for (const char* loop : {"{% for i in range(100000) %}{% if n in h %}{% endif %}{% endfor %}",
                           "{% set t = 'a' * 8000000 %}{% for i in range(1000000) %}{% if h == t %}{% endif %}{% endfor %}",
                           "{{ ([h] * 100000) | sort(case_sensitive=true) | length }}", "{% for i in range(100000) %}{{ h[-1] }}{% endfor %}",
                           "{% for i in range(100000) %}{{ h | length }}{% endfor %}",
                           "{% set d = {h: 1} %}{% for i in range(1000000) %}{{ d[h] }}{% endfor %}",
                           "{% set l = range(100000) | list %}{% for i in range(100000) %}{{ -1 in l }}{% endfor %}"})
    expect_error([&] { render(h + loop); }, {"more than 1000000 steps"});
  // Sorting without case makes each item's lower-cased key once, and counts it as made.
  expect_error([&] { render(h + "{{ ([h] * 100000) | sort | length }}"); }, {"more than 256 MiB"});
  EXPECT_EQ(render("{{ (['b', 'A', 'a', 'C'] * 2) | sort }}"), "['A', 'a', 'A', 'a', 'b', 'b', 'C', 'C']");
  // A string walked character by character is sized before its characters are made.
  expect_error([&] { render(h + "{% for c in h %}{% endfor %}"); }, {"list of more than 1048576 items"});
  expect_error([&] { render(h + "{{ h | list | length }}"); }, {"list of more than 1048576 items"});
  expect_error([&] { render("{{ ('a ' * 4000000).split() | length }}"); }, {"list of more than 1048576 items"});
  EXPECT_EQ(render("{{ ('a ' * 4000000) | wordcount }}"), "4000000");
  // Strings |map makes are counted as any filter's are.
  expect_error([&] { render(s + "{{ ([s] * 1000) | map('upper') | list | length }}"); }, {"more than 256 MiB"});
  // Lines are indented one at a time, not all split first; batches are lists of their own, counted.
  expect_error([&] { render("{{ ('\\n' * 16000000) | indent(2, blank=true) }}"); }, {"string longer than 16 MiB"});
  EXPECT_EQ(render("{{ ('a\\nb' * 3) | indent(1) }}"), "a\n ba\n ba\n b");
  EXPECT_EQ(render("{{ range(1000000) | batch(1) | list | length }}"), "1000000");
  // |unique of a million items: one pass, not a million squared.
  EXPECT_EQ(render("{{ range(1000000) | list | unique | list | length }}"), "1000000");
  EXPECT_EQ(render("{{ (['a', 'b'] * 500000) | unique | list }}"), "['a', 'b']");
  // Nothing above held more than a few copies of its longest string.
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  EXPECT_LT(usage.ru_maxrss, 1200L * 1024) << "peak resident KiB";
}

}  // namespace
}  // namespace vkvlm::test
