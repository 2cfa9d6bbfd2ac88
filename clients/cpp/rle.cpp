#include "rle.hpp"

namespace egx {

std::vector<uint32_t> rle_runs(const std::string& counts) {
  std::vector<int64_t> runs;
  size_t p = 0;
  while (p < counts.size()) {
    int64_t x = 0;
    int k = 0;
    bool more = true;
    while (more) {
      if (p >= counts.size()) throw RleError("truncated RLE counts string");
      const int64_t c = static_cast<int64_t>(counts[p]) - 48;
      if (c < 0 || c > 63) throw RleError("invalid character in RLE counts string");
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) != 0;
      ++p;
      ++k;
      if (!more && (c & 0x10)) x |= -(int64_t{1} << (5 * k));
    }
    if (runs.size() > 2) x += runs[runs.size() - 2];
    if (x < 0) throw RleError("negative run in RLE counts string");
    runs.push_back(x);
  }
  return std::vector<uint32_t>(runs.begin(), runs.end());
}

std::vector<uint8_t> rle_decode(const std::string& counts, uint32_t height, uint32_t width) {
  const auto runs = rle_runs(counts);
  const uint64_t n = uint64_t{height} * width;
  std::vector<uint8_t> mask(n, 0);
  uint64_t pos = 0;
  uint8_t value = 0;
  for (uint32_t r : runs) {
    if (pos + r > n) throw RleError("RLE runs exceed the mask size");
    for (uint64_t i = pos; i < pos + r; ++i) {
      const uint64_t col = i / height, row = i % height;  // column-major
      mask[row * width + col] = value;
    }
    pos += r;
    value ^= 1;
  }
  if (pos != n) throw RleError("RLE runs do not cover the mask");
  return mask;
}

}  // namespace egx
