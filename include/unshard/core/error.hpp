#pragma once
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace unshard {

// The one exception type of the library. Its message always names the culprit (tensor, file,
// byte offset, option, rank), so callers can print what() and nothing else.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A rank failed; every other rank throws this too, naming the failing rank and its reason.
class rank_failure : public error {
 public:
  rank_failure(int failed_rank, const std::string& what) : error(what), failed_rank_(failed_rank) {}
  int failed_rank() const noexcept { return failed_rank_; }

 private:
  int failed_rank_;
};

// Memory ran out in a tracked category (the budget or the planned peak was exceeded).
class out_of_memory : public error {
 public:
  using error::error;
};

namespace detail {
template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
}  // namespace detail

// throw_error("tensor '", name, "': expected ", n, " bytes") -- message built only on failure.
template <class... Args>
[[noreturn]] void throw_error(Args&&... args) {
  throw error(detail::concat(std::forward<Args>(args)...));
}

}  // namespace unshard
