#include "io/png.h"

#include <png.h>

#include <algorithm>
#include <csetjmp>
#include <fstream>
#include <iterator>

#include "io/tensor_file.h"

namespace loom::io {

std::string encode_png(const RgbImage& img) {
  LOOM_CHECK(img.width > 0 && img.height > 0 && img.width <= 0x7fffffff && img.height <= 0x7fffffff,
             "encode_png: bad image size ", img.width, "x", img.height);
  LOOM_CHECK(int64_t(img.rgb.size()) == img.width * img.height * 3, "encode_png: ", img.rgb.size(),
             " bytes for a ", img.width, "x", img.height, " RGB image");
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  image.width = png_uint_32(img.width);
  image.height = png_uint_32(img.height);
  image.format = PNG_FORMAT_RGB;
  png_alloc_size_t size = 0;
  LOOM_CHECK(png_image_write_get_memory_size(image, size, 0, img.rgb.data(), 0, nullptr), "encode_png: libpng: ",
             image.message);
  std::string png(size, '\0');
  LOOM_CHECK(png_image_write_to_memory(&image, png.data(), &size, 0, img.rgb.data(), 0, nullptr),
             "encode_png: libpng: ", image.message);
  png.resize(size);
  return png;
}

namespace {

// libpng's classic API (the simplified one converts by the file's gAMA chunk, which PIL does not).
struct MemoryReader {
  const std::string* bytes;
  size_t pos;
};

void read_from_memory(png_structp png, png_bytep out, png_size_t n) {
  auto* r = static_cast<MemoryReader*>(png_get_io_ptr(png));
  if (n > r->bytes->size() - r->pos) png_error(png, "the file ends early (truncated)");
  std::copy_n(r->bytes->data() + r->pos, n, reinterpret_cast<char*>(out));
  r->pos += n;
}

void on_error(png_structp png, png_const_charp message) {
  *static_cast<std::string*>(png_get_error_ptr(png)) = message;
  longjmp(png_jmpbuf(png), 1);
}
void on_warning(png_structp, png_const_charp) {}

// Reads the whole image as 8-bit RGB into `out` (rows: scratch). No C++ object is constructed
// in this frame, so libpng's longjmp back to it skips no destructor. False on any error.
bool read_rgb(png_structp png, png_infop info, MemoryReader* reader, RgbImage* out, std::vector<png_bytep>* rows,
              bool* sixteen_bit) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_set_read_fn(png, reader, read_from_memory);
  png_read_info(png, info);
  const int depth = png_get_bit_depth(png, info), color = png_get_color_type(png, info);
  if (depth == 16) {
    *sixteen_bit = true;
    return false;
  }
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  png_set_strip_alpha(png);  // alpha channels and tRNS are dropped, as PIL's convert("RGB")
  if (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  out->width = png_get_image_width(png, info), out->height = png_get_image_height(png, info);
  if (png_get_rowbytes(png, info) != size_t(out->width) * 3) png_error(png, "unexpected row layout after conversion to RGB");
  out->rgb.resize(size_t(out->width) * size_t(out->height) * 3);
  rows->resize(size_t(out->height));
  for (size_t y = 0; y < rows->size(); ++y) (*rows)[y] = out->rgb.data() + y * size_t(out->width) * 3;
  png_read_image(png, rows->data());
  png_read_end(png, nullptr);
  return true;
}

}  // namespace

RgbImage decode_png(const std::string& bytes, const std::string& source) {
  if (bytes.size() < 8 || png_sig_cmp(reinterpret_cast<png_const_bytep>(bytes.data()), 0, 8) != 0)
    throw FileError(source, "not a PNG file (no PNG signature)");
  std::string message;
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &message, on_error, on_warning);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!info) {
    png_destroy_read_struct(&png, nullptr, nullptr);
    throw FileError(source, "libpng could not start a reader (out of memory?)");
  }
  png_set_user_limits(png, 1u << 16, 1u << 16);  // at most 65536 pixels a side
  MemoryReader reader{&bytes, 0};
  RgbImage out;
  std::vector<png_bytep> rows;
  bool sixteen_bit = false;
  const bool ok = read_rgb(png, info, &reader, &out, &rows, &sixteen_bit);
  png_destroy_read_struct(&png, &info, nullptr);
  if (sixteen_bit) throw FileError(source, "16-bit PNGs are not supported (save the image with 8 bits per channel)");
  if (!ok) throw FileError(source, "corrupt PNG (libpng: " + message + ")");
  return out;
}

RgbImage read_png(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in.good()) throw FileError(path, "cannot open");
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return decode_png(bytes, path);
}

void write_png(const std::string& path, const RgbImage& image) { write_file_atomic(path, encode_png(image)); }

}  // namespace loom::io
