// The JSON used by the C++ client: parse, access, write, and refuse malformed text.
#include <cstdio>

#include "json.hpp"

static int failures = 0;
#define CHECK(cond) \
  do { if (!(cond)) { std::fprintf(stderr, "FAILED line %d: %s\n", __LINE__, #cond); ++failures; } } while (0)

int main() {
  auto j = egx::Json::parse(R"({"id":"a\"b","seq":3,"ok":true,"none":null,"list":[1,2.5,-3e2],
                               "text":"caf\u00e9 \ud83d\ude80\n","nested":{"k":[{}]}})");
  CHECK(j.get("id").as_string() == "a\"b");
  CHECK(j.get("seq").as_number() == 3);
  CHECK(j.get("ok").as_bool());
  CHECK(j.get("none").is_null() && j.get("missing").is_null());
  CHECK(j.get("list").items().size() == 3 && j.get("list").items()[2].as_number() == -300);
  CHECK(j.get("text").as_string() == "caf\xc3\xa9 \xf0\x9f\x9a\x80\n");
  auto again = egx::Json::parse(j.dump());
  CHECK(again.dump() == j.dump());
  CHECK(egx::Json::parse("[]").items().empty());
  const char* bad[] = {"", "{", "{\"a\" 1}", "[1,]", "\"open", "nul", "{} x", "[\"\\q\"]"};
  for (const char* text : bad) {
    bool threw = false;
    try { egx::Json::parse(text); } catch (const egx::JsonError&) { threw = true; }
    CHECK(threw);
  }
  bool wrong_type = false;
  try { j.get("seq").as_string(); } catch (const egx::JsonError&) { wrong_type = true; }
  CHECK(wrong_type);
  if (failures == 0) std::printf("json_test: all passed\n");
  return failures == 0 ? 0 : 1;
}
