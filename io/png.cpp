#include "io/png.h"

#include <png.h>

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

RgbImage decode_png(const std::string& bytes, const std::string& source) {
  if (bytes.size() < 8 || png_sig_cmp(reinterpret_cast<png_const_bytep>(bytes.data()), 0, 8) != 0)
    throw FileError(source, "not a PNG file (no PNG signature)");
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_memory(&image, bytes.data(), bytes.size()))
    throw FileError(source, std::string("not a readable PNG (libpng: ") + image.message + ")");
  if (image.format & PNG_FORMAT_FLAG_LINEAR) {
    png_image_free(&image);
    throw FileError(source, "16-bit PNGs are not supported (save the image with 8 bits per channel)");
  }
  image.format = PNG_FORMAT_RGBA;  // grey and palettes expanded; alpha kept, then dropped below
  std::vector<uint8_t> rgba(PNG_IMAGE_SIZE(image));
  if (!png_image_finish_read(&image, nullptr, rgba.data(), 0, nullptr))
    throw FileError(source, std::string("corrupt PNG (libpng: ") + image.message + ")");
  RgbImage out;
  out.width = image.width, out.height = image.height;
  const size_t pixels = size_t(out.width) * size_t(out.height);
  out.rgb.resize(pixels * 3);
  for (size_t i = 0; i < pixels; ++i)
    for (size_t c = 0; c < 3; ++c) out.rgb[3 * i + c] = rgba[4 * i + c];
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
