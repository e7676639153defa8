#pragma once
// Checks that an input is refused with one line that names what is wrong.
#include <gtest/gtest.h>

#include <initializer_list>
#include <string>

namespace vkvlm::test {

// f() must throw; its message must hold every word and be one line.
template <typename F>
void expect_error(F&& f, std::initializer_list<const char*> words) {
  try {
    f();
    ADD_FAILURE() << "expected an error";
  } catch (const std::exception& e) {
    const std::string m = e.what();
    for (auto* w : words) EXPECT_NE(m.find(w), std::string::npos) << "'" << w << "' missing from: " << m;
    EXPECT_EQ(m.find('\n'), std::string::npos) << "errors are one line: " << m;
  }
}

}  // namespace vkvlm::test
