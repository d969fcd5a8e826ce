#include "unet/vae_image.h"

#include <algorithm>
#include <cmath>

namespace loom::unet {

Tensor images_to_tensor(const std::vector<io::RgbImage>& images, DType dtype) {
  LOOM_CHECK(!images.empty(), "images_to_tensor: no images");
  const int64_t n = int64_t(images.size()), h = images[0].height, w = images[0].width;
  std::vector<float> values(size_t(n * 3 * h * w));
  for (int64_t b = 0; b < n; ++b) {
    const io::RgbImage& img = images[size_t(b)];
    LOOM_CHECK(img.height == h && img.width == w, "images_to_tensor: image ", b, " is ", img.width, "x", img.height,
               ", image 0 is ", w, "x", h, " (one batch holds images of one size)");
    for (int64_t c = 0; c < 3; ++c)
      for (int64_t i = 0; i < h * w; ++i) {
        const float p = float(img.rgb[size_t(3 * i + c)]) / 255.0f;  // [N, H, W, 3] -> [N, 3, H, W]
        values[size_t(((b * 3 + c) * h) * w + i)] = 2.0f * p - 1.0f;
      }
  }
  return Tensor::from_vector(values, {n, 3, h, w}).to(dtype);
}

io::RgbImage tensor_to_image(const Tensor& image) {
  LOOM_CHECK(image.defined() && image.dim() == 3 && image.size(0) == 3, "tensor_to_image: expected [3, H, W], got ",
             image.defined() ? image.shape() : Shape{});
  const int64_t h = image.size(1), w = image.size(2);
  const std::vector<double> x = image.to(Device::cpu()).to_vector();
  io::RgbImage out;
  out.width = w, out.height = h;
  out.rgb.resize(size_t(3 * h * w));
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t i = 0; i < h * w; ++i) {
      float v = float(x[size_t(c * h * w + i)]) * 0.5f + 0.5f;
      v = std::fmin(std::fmax(v, 0.0f), 1.0f);
      out.rgb[size_t(3 * i + c)] = uint8_t(std::nearbyint(v * 255.0f));  // [3, H, W] -> [H, W, 3]
    }
  return out;
}

io::RgbImage center_crop(const io::RgbImage& image, int64_t multiple) {
  LOOM_CHECK(multiple > 0 && image.width >= multiple && image.height >= multiple, "center_crop: a ", image.width, "x",
             image.height, " image has no ", multiple, "-aligned part");
  const int64_t w = image.width / multiple * multiple, h = image.height / multiple * multiple;
  const int64_t left = (image.width - w) / 2, top = (image.height - h) / 2;
  io::RgbImage out;
  out.width = w, out.height = h;
  out.rgb.resize(size_t(3 * w * h));
  for (int64_t y = 0; y < h; ++y)
    std::copy_n(image.rgb.begin() + 3 * ((top + y) * image.width + left), 3 * w, out.rgb.begin() + 3 * y * w);
  return out;
}

}  // namespace loom::unet
