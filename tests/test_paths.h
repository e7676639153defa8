#pragma once
#include <cctype>
#include <cstdlib>
#include <string>

namespace vkvlm::test {
// tests/data in the source tree (set by CMake), or $VKVLM_TEST_DATA where the binaries run away
// from it (scripts/gpu-check carries a subset of the fixtures to a GPU machine).
inline std::string test_data_dir() {
  const char* env = std::getenv("VKVLM_TEST_DATA");
  return env && *env ? std::string(env) : std::string(VKVLM_TEST_DATA);
}
inline std::string fixtures_dir() { return test_data_dir() + "/fixtures"; }
// A parameterized test's name from words: anything but letters and digits becomes '_'.
inline std::string test_name(std::string n) {
  for (char& ch : n)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return n;
}

}  // namespace vkvlm::test
