#pragma once
#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "unshard/core/error.hpp"

namespace unshard::detail {

// nlohmann's DOM parser silently keeps the last of two equal keys. In a checkpoint header that
// makes a tensor name ambiguous (two readers may disagree on which entry wins), so we build the
// DOM from SAX events ourselves and refuse duplicates. Building it here also bounds the nesting
// depth, which keeps hostile input from exhausting the stack when the DOM is later walked.
class strict_json_builder {
 public:
  using json = nlohmann::json;

  strict_json_builder(const std::string& what, std::string_view top_key_noun, std::size_t base_offset,
                      std::size_t max_depth)
      : what_(what), top_key_noun_(top_key_noun), base_offset_(base_offset), max_depth_(max_depth) {}

  bool null() { return put(nullptr); }
  bool boolean(bool v) { return put(v); }
  bool number_integer(json::number_integer_t v) { return put(v); }
  bool number_unsigned(json::number_unsigned_t v) { return put(v); }
  bool number_float(json::number_float_t v, const std::string&) { return put(v); }
  bool string(std::string& v) { return put(std::move(v)); }
  bool binary(json::binary_t& v) { return put(json::binary(std::move(v))); }

  bool start_object(std::size_t) { return open(json::object()); }
  bool start_array(std::size_t) { return open(json::array()); }
  bool end_object() { return close(); }
  bool end_array() { return close(); }

  bool key(std::string& k) {
    if (stack_.back()->contains(k)) {
      if (stack_.size() == 1) throw_error(what_, ": duplicate ", top_key_noun_, " '", k, "'");
      throw_error(what_, ": duplicate key '", k, "' inside '", keys_.back(), "'");
    }
    key_ = std::move(k);
    return true;
  }

  bool parse_error(std::size_t position, const std::string&, const nlohmann::json::exception& e) {
    // nlohmann counts characters read, so the offending byte is the last one consumed.
    const std::size_t at = base_offset_ + (position > 0 ? position - 1 : 0);
    throw_error(what_, ": invalid JSON at byte offset ", at, ": ", e.what());
  }

  json take() { return std::move(root_); }

 private:
  // Places v where the parser currently is and returns its address. Addresses of open containers
  // stay valid: an array only grows after its open child has been closed, and map nodes never move.
  json* insert(json v) {
    if (stack_.empty()) {
      root_ = std::move(v);
      return &root_;
    }
    json& parent = *stack_.back();
    if (parent.is_array()) {
      parent.push_back(std::move(v));
      return &parent.back();
    }
    json& slot = parent[key_];
    slot = std::move(v);
    return &slot;
  }
  bool put(json v) {
    insert(std::move(v));
    return true;
  }
  bool open(json v) {
    if (stack_.size() >= max_depth_) throw_error(what_, ": JSON nested deeper than ", max_depth_, " levels");
    const bool in_object = !stack_.empty() && stack_.back()->is_object();
    keys_.push_back(in_object ? key_ : (stack_.empty() ? std::string("<root>") : keys_.back()));
    stack_.push_back(insert(std::move(v)));
    return true;
  }
  bool close() {
    stack_.pop_back();
    keys_.pop_back();
    return true;
  }

  const std::string& what_;
  std::string_view top_key_noun_;
  std::size_t base_offset_;
  std::size_t max_depth_;
  json root_;
  std::vector<json*> stack_;
  std::vector<std::string> keys_;  // the key each open container was stored under, for messages
  std::string key_;
};

// Parses text as one strict JSON document (no comments, no trailing garbage, no duplicate keys).
// `what` prefixes every error; base_offset is added to reported byte positions (the text's
// position in its file); top_key_noun names top-level keys in the duplicate message.
inline nlohmann::json parse_json_strict(std::string_view text, const std::string& what,
                                        std::string_view top_key_noun = "key", std::size_t base_offset = 0,
                                        std::size_t max_depth = 32) {
  strict_json_builder builder(what, top_key_noun, base_offset, max_depth);
  try {
    nlohmann::json::sax_parse(text.begin(), text.end(), &builder, nlohmann::json::input_format_t::json, true, false);
  } catch (const nlohmann::json::exception& e) {
    throw_error(what, ": invalid JSON: ", e.what());
  }
  return builder.take();
}

// A bounded rendering of a JSON value for error messages (a hostile header can be huge).
inline std::string short_dump(const nlohmann::json& v, std::size_t limit = 64) {
  std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (s.size() > limit) s = s.substr(0, limit) + "...";
  return s;
}

}  // namespace unshard::detail
