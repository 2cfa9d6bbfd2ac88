// COCO run-length encoding of binary masks (the compressed "counts" string of pycocotools).
// Masks are row-major H x W bytes (0/1); COCO runs are column-major, starting with background.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace egx {

struct RleError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Run lengths from a compressed counts string. Throws RleError on a malformed string.
std::vector<uint32_t> rle_runs(const std::string& counts);

// Decode to a row-major mask of height*width bytes. Throws RleError if the runs do not cover it.
std::vector<uint8_t> rle_decode(const std::string& counts, uint32_t height, uint32_t width);

}  // namespace egx
