// Loss-curve plots as PNG files: a tiny raster (grid, axes, tick marks, a 3x5
// pixel font for the tick labels and axis titles, a 2-px polyline), encoded
// and compressed by libpng (Debian's libpng-dev, found through CMake's FindPNG).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace loom::trainer {

// An 8-bit RGB colour.
struct Rgb {
  uint8_t r, g, b;
};

// The colours of a chart (tests look for these exact values).
inline constexpr Rgb kPlotBackground{255, 255, 255};  // white
inline constexpr Rgb kPlotGrid{220, 220, 220};        // light grey, one line per y tick
inline constexpr Rgb kPlotAxis{64, 64, 64};           // axes, tick marks and labels
inline constexpr Rgb kPlotCurve{24, 48, 160};         // the loss curve (dark blue)

// Renders the loss curve of `losses` (x: step 1..n; y: loss on a log10 scale
// when every finite loss is > 0 and max/min > 10, else linear) as an RGB PNG
// of width x height pixels and returns the PNG file's bytes: white
// background, light grey grid lines at the y ticks, axes with small tick
// marks, when there is room: the value of every y tick and the step of the x
// ticks (1, nice steps, the last), the axis titles "step" and "loss" ("loss
// (log scale)" on a log scale), and the curve as a 2-px dark blue polyline.
// NaN/Inf losses are skipped (the line breaks there). An empty vector gives a
// valid blank chart. Throws loom::Error unless 16 <= width, height <= 16384.
std::string render_loss_png(const std::vector<double>& losses, int width = 640, int height = 360);

}  // namespace loom::trainer
