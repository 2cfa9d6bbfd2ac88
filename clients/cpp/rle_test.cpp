// Known values written by pycocotools.mask.encode.
#include <iostream>

#include "rle.hpp"

static int failures = 0;
static void check(bool ok, const char* what) {
  if (!ok) {
    std::cerr << "FAIL: " << what << "\n";
    ++failures;
  }
}

int main() {
  // 3x2 mask with only (row 1, col 0) set: pycocotools counts "114"
  auto m = egx::rle_decode("114", 3, 2);
  check(m == std::vector<uint8_t>({0, 0, 1, 0, 0, 0}), "3x2 single pixel");
  // all foreground 4x4: runs 0,16
  auto full = egx::rle_decode("0`0", 4, 4);
  bool all = true;
  for (auto v : full) all = all && v == 1;
  check(all, "4x4 all foreground");
  bool threw = false;
  try {
    egx::rle_decode("114", 4, 4);
  } catch (const egx::RleError&) {
    threw = true;
  }
  check(threw, "size mismatch is refused");
  if (failures == 0) std::cout << "egx_rle_test: ok\n";
  return failures == 0 ? 0 : 1;
}
