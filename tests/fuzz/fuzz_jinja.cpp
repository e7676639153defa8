// Chat templates as a stranger may write them: parsed and rendered with the interpreter's
// limits (nesting, calls, steps, sizes). Input: the template, then a JSON object of variables
// (a conversation by default).
#include <nlohmann/json.hpp>

#include "host/jinja.h"
#include "tests/fuzz/fuzz_input.h"

using namespace vkvlm;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = fuzz::split_parts(data, size, 2);
  std::map<std::string, jinja::Value> vars;
  nlohmann::ordered_json context;
  if (parts.size() > 1) {
    try {
      context = nlohmann::ordered_json::parse(parts[1]);
    } catch (const std::exception&) {
    }
  }
  if (!context.is_object())
    context = {{"messages", {{{"role", "system"}, {"content", "Be brief."}},
                             {{"role", "user"}, {"content", {{{"type", "image"}}, {{"type", "text"}, {"text", "Hi"}}}}},
                             {{"role", "assistant"}, {"content", "Hello."}}}},
               {"add_generation_prompt", true},
               {"bos_token", "<s>"},
               {"eos_token", "</s>"},
               {"tools", nullptr}};
  try {
    for (auto& [k, v] : context.items()) vars[k] = jinja::Value::from_json(v);
    const jinja::Template t(parts[0], "fuzz template");
    (void)t.render(vars);
  } catch (const std::exception&) {
  }
  return 0;
}
