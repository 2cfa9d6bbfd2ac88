#include "json.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace egx {

namespace {

const Json kNull;

void expect_type(bool ok, const char* what) {
  if (!ok) throw JsonError(std::string("JSON value is not ") + what);
}

void write_string(const std::string& s, std::string& out) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

void append_utf8(unsigned code, std::string& out) {
  if (code < 0x80) {
    out += static_cast<char>(code);
  } else if (code < 0x800) {
    out += static_cast<char>(0xC0 | (code >> 6));
    out += static_cast<char>(0x80 | (code & 0x3F));
  } else if (code < 0x10000) {
    out += static_cast<char>(0xE0 | (code >> 12));
    out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (code & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (code >> 18));
    out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (code & 0x3F));
  }
}

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Json document() {
    Json v = value(0);
    skip();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& why) const {
    throw JsonError("invalid JSON at offset " + std::to_string(i_) + ": " + why);
  }
  void skip() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  bool literal(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(i_, n, word) != 0) return false;
    i_ += n;
    return true;
  }
  unsigned hex4() {
    if (i_ + 4 > s_.size()) fail("short \\u escape");
    unsigned v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = s_[i_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else fail("bad \\u escape");
    }
    return v;
  }
  std::string string() {
    ++i_;  // opening quote
    std::string out;
    while (true) {
      if (i_ >= s_.size()) fail("unterminated string");
      char c = s_[i_++];
      if (c == '"') return out;
      if (c != '\\') { out += c; continue; }
      if (i_ >= s_.size()) fail("unterminated escape");
      char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned code = hex4();
          if (code >= 0xD800 && code < 0xDC00 && literal("\\u")) {  // a surrogate pair
            unsigned low = hex4();
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(code, out);
          break;
        }
        default: fail("bad escape");
      }
    }
  }
  Json value(int depth) {
    if (depth > 64) fail("nested too deeply");
    skip();
    if (i_ >= s_.size()) fail("unexpected end");
    char c = s_[i_];
    if (c == '{') {
      ++i_;
      Json obj = Json::object();
      skip();
      if (i_ < s_.size() && s_[i_] == '}') { ++i_; return obj; }
      while (true) {
        skip();
        if (i_ >= s_.size() || s_[i_] != '"') fail("expected a key");
        std::string key = string();
        skip();
        if (i_ >= s_.size() || s_[i_++] != ':') fail("expected ':'");
        obj.set(key, value(depth + 1));
        skip();
        if (i_ < s_.size() && s_[i_] == ',') { ++i_; continue; }
        if (i_ < s_.size() && s_[i_] == '}') { ++i_; return obj; }
        fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      ++i_;
      Json arr = Json::array();
      skip();
      if (i_ < s_.size() && s_[i_] == ']') { ++i_; return arr; }
      while (true) {
        arr.push(value(depth + 1));
        skip();
        if (i_ < s_.size() && s_[i_] == ',') { ++i_; continue; }
        if (i_ < s_.size() && s_[i_] == ']') { ++i_; return arr; }
        fail("expected ',' or ']'");
      }
    }
    if (c == '"') return Json(string());
    if (literal("true")) return Json(true);
    if (literal("false")) return Json(false);
    if (literal("null")) return Json();
    const char* start = s_.c_str() + i_;
    char* end = nullptr;
    double n = std::strtod(start, &end);
    if (end == start) fail("unexpected character");
    i_ += static_cast<size_t>(end - start);
    return Json(n);
  }
};

}  // namespace

bool Json::as_bool() const { expect_type(type_ == Type::Bool, "a boolean"); return bool_; }
double Json::as_number() const { expect_type(type_ == Type::Number, "a number"); return number_; }
const std::string& Json::as_string() const { expect_type(type_ == Type::String, "a string"); return string_; }
const std::vector<Json>& Json::items() const { expect_type(type_ == Type::Array, "an array"); return items_; }
const std::vector<std::pair<std::string, Json>>& Json::members() const {
  expect_type(type_ == Type::Object, "an object");
  return members_;
}

const Json& Json::get(const std::string& key) const {
  if (type_ != Type::Object) return kNull;
  for (const auto& kv : members_)
    if (kv.first == key) return kv.second;
  return kNull;
}

Json& Json::set(const std::string& key, Json value) {
  expect_type(type_ == Type::Object, "an object");
  for (auto& kv : members_)
    if (kv.first == key) return kv.second = std::move(value);
  members_.emplace_back(key, std::move(value));
  return members_.back().second;
}

Json& Json::push(Json value) {
  expect_type(type_ == Type::Array, "an array");
  items_.push_back(std::move(value));
  return items_.back();
}

void Json::dump_to(std::string& out) const {
  switch (type_) {
    case Type::Null: out += "null"; break;
    case Type::Bool: out += bool_ ? "true" : "false"; break;
    case Type::Number: {
      if (!std::isfinite(number_)) throw JsonError("JSON cannot hold a non-finite number");
      char buf[32];
      if (number_ == std::floor(number_) && std::fabs(number_) < 1e15)
        std::snprintf(buf, sizeof buf, "%.0f", number_);
      else
        std::snprintf(buf, sizeof buf, "%.17g", number_);
      out += buf;
      break;
    }
    case Type::String: write_string(string_, out); break;
    case Type::Array:
      out += '[';
      for (size_t k = 0; k < items_.size(); ++k) {
        if (k) out += ',';
        items_[k].dump_to(out);
      }
      out += ']';
      break;
    case Type::Object:
      out += '{';
      for (size_t k = 0; k < members_.size(); ++k) {
        if (k) out += ',';
        write_string(members_[k].first, out);
        out += ':';
        members_[k].second.dump_to(out);
      }
      out += '}';
      break;
  }
}

std::string Json::dump() const {
  std::string out;
  dump_to(out);
  return out;
}

Json Json::parse(const std::string& text) { return Parser(text).document(); }

}  // namespace egx
