// Images in and out of the VAE, as diffusers' VaeImageProcessor converts them:
//   to the encoder:   x = 2·(p / 255) − 1, computed in f32 (pil_to_numpy, normalize);
//   from the decoder: p = round(255 · clamp(x/2 + 0.5, 0, 1)), computed in f32 with
//                     round-half-to-even (denormalize, numpy_to_pil).
#pragma once

#include <vector>

#include "io/png.h"
#include "tensor/tensor.h"

namespace loom::unet {

// Images of one size -> [N, 3, H, W] in `dtype` (CPU). Throws when sizes differ.
Tensor images_to_tensor(const std::vector<io::RgbImage>& images, DType dtype = DType::F32);
// One decoded image [3, H, W] (any float dtype, any device) -> 8-bit RGB.
io::RgbImage tensor_to_image(const Tensor& image);
// The centre `multiple`-aligned part of `image` (each side cut to the largest multiple of
// `multiple`; the left / top offset is half the surplus, rounded down). Throws when a side
// is smaller than `multiple`.
io::RgbImage center_crop(const io::RgbImage& image, int64_t multiple);

}  // namespace loom::unet
