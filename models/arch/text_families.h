#pragma once
// The decoder families vkvlm runs and what each one's transformers config class assumes where
// config.json is silent (host/config.h's TextDefaults), next to the architectures that use them.
#include <string>
#include <vector>

#include "host/config.h"

namespace vkvlm {

// The family named `family` (config.json's model_type for plain causal LMs); an unknown one is
// an error naming `where` and listing the known ones.
const TextDefaults& text_family(const std::string& family, const std::string& where);

// Their names, for messages.
std::vector<std::string> text_families();

}  // namespace vkvlm
