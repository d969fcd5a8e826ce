// 8-bit RGB images as PNG files, through libpng (Debian's libpng-dev): the writer of
// the loss plot (trainer/plot.cpp) and of `loom decode`, the reader of `loom encode`.
//
// Reading converts every 8-bit PNG colour type to RGB as PIL's Image.convert("RGB")
// does: grey is replicated, a palette is expanded, an alpha channel (or tRNS) is
// dropped, not composited, and the gAMA / colour chunks are ignored (the values are
// taken as stored). 16-bit PNGs are refused (PIL and libpng disagree on them); at most
// 65536 pixels a side. Errors are io::FileError naming the file and libpng's reason.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace loom::io {

struct RgbImage {
  int64_t width = 0, height = 0;
  std::vector<uint8_t> rgb;  // row-major, height × width × 3
};

// The bytes of a PNG file holding `image` (checks rgb.size() == width·height·3).
std::string encode_png(const RgbImage& image);
// Decodes PNG bytes; `source` names the file in errors.
RgbImage decode_png(const std::string& bytes, const std::string& source);

RgbImage read_png(const std::string& path);
// Atomic (write_file_atomic): a failed write leaves the previous file as it was.
void write_png(const std::string& path, const RgbImage& image);

}  // namespace loom::io
