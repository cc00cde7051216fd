#pragma once
// The message of the unshard::error a callable throws, for tests that check what an error names.
#include <doctest/doctest.h>

#include <exception>
#include <string>

#include "unshard/core/error.hpp"

namespace unshard::testing {

// The message of the unshard::error f throws; fails the test if it throws nothing or something else.
template <class F>
inline std::string error_of(F&& f) {
  try {
    f();
  } catch (const unshard::error& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL("threw a non-unshard exception: " << e.what());
  } catch (...) {
    FAIL("threw a non-standard exception");
  }
  FAIL("did not throw");
  return {};
}

inline bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace unshard::testing
