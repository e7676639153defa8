#pragma once
#include <string>

namespace vkvlm::test {
// tests/data/fixtures in the source tree (set by CMake).
inline std::string fixtures_dir() { return VKVLM_TEST_DATA "/fixtures"; }
inline std::string test_data_dir() { return VKVLM_TEST_DATA; }
}  // namespace vkvlm::test
