// egx_rle_decode H W COUNTS > mask.pgm : decode one COCO-RLE mask to a binary PGM (0/255).
#include <cstdio>
#include <cstdlib>
#include <iostream>

#include "rle.hpp"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: egx_rle_decode HEIGHT WIDTH COUNTS > mask.pgm\n";
    return 2;
  }
  try {
    const auto h = static_cast<uint32_t>(std::stoul(argv[1]));
    const auto w = static_cast<uint32_t>(std::stoul(argv[2]));
    auto mask = egx::rle_decode(argv[3], h, w);
    std::cout << "P5\n" << w << " " << h << "\n255\n";
    for (auto& v : mask) v = v ? 255 : 0;
    std::cout.write(reinterpret_cast<const char*>(mask.data()), static_cast<std::streamsize>(mask.size()));
  } catch (const std::exception& e) {
    std::cerr << "egx_rle_decode: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
