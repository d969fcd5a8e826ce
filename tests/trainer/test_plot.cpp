// Loss-curve PNGs: the file (read back with libpng's reader: IHDR, compression,
// size) and the picture itself (white background, a dark blue curve going the
// right way, log/linear y scale, NaN/Inf gaps, labels at the ticks, axis titles).
#include <gtest/gtest.h>
#include <png.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "tensor/error.h"
#include "trainer/plot.h"

namespace loom::trainer {
namespace {

// ---------------------------------------------------------------------------
// Reading the PNG back with libpng's own reader (the chunk CRCs and the zlib
// stream are checked by libpng).
// ---------------------------------------------------------------------------

uint32_t be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3];
}

struct Decoded {
  uint32_t width = 0, height = 0;
  uint8_t depth = 0, color = 0, interlace = 0;
  std::vector<uint8_t> px;  // RGB, rows top to bottom
};

// Full decode; use under ASSERT_NO_FATAL_FAILURE.
void decode(const std::string& png, Decoded* d) {
  ASSERT_GE(png.size(), 33u);
  ASSERT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  const auto* p = reinterpret_cast<const uint8_t*>(png.data());
  ASSERT_EQ(std::string(png.data() + 12, 4), "IHDR");
  d->depth = p[24], d->color = p[25], d->interlace = p[28];
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  ASSERT_TRUE(png_image_begin_read_from_memory(&image, png.data(), png.size())) << image.message;
  image.format = PNG_FORMAT_RGB;
  d->width = image.width, d->height = image.height;
  EXPECT_EQ(be32(p + 16), d->width);
  EXPECT_EQ(be32(p + 20), d->height);
  d->px.resize(PNG_IMAGE_SIZE(image));
  ASSERT_TRUE(png_image_finish_read(&image, nullptr, d->px.data(), 0, nullptr)) << image.message;
}

// ---------------------------------------------------------------------------
// Looking at the picture
// ---------------------------------------------------------------------------

bool is(const Decoded& d, int x, int y, Rgb c) {
  const uint8_t* p = &d.px[(size_t(y) * d.width + size_t(x)) * 3];
  return p[0] == c.r && p[1] == c.g && p[2] == c.b;
}

size_t count(const Decoded& d, Rgb c) {
  size_t n = 0;
  for (uint32_t y = 0; y < d.height; ++y)
    for (uint32_t x = 0; x < d.width; ++x) n += is(d, int(x), int(y), c);
  return n;
}

// Mean row of the curve's pixels in column x, or NaN when there are none.
double curve_row(const Decoded& d, int x) {
  double sum = 0;
  int n = 0;
  for (uint32_t y = 0; y < d.height; ++y)
    if (is(d, x, int(y), kPlotCurve)) sum += y, ++n;
  return n ? sum / n : NAN;
}

// First and last columns holding curve pixels (-1, -1 when none).
std::pair<int, int> curve_columns(const Decoded& d) {
  int first = -1, last = -1;
  for (uint32_t x = 0; x < d.width; ++x)
    if (!std::isnan(curve_row(d, int(x)))) {
      if (first < 0) first = int(x);
      last = int(x);
    }
  return {first, last};
}

Decoded render(const std::vector<double>& losses, int w = 640, int h = 360) {
  Decoded d;
  const std::string png = render_loss_png(losses, w, h);
  decode(png, &d);  // callers check HasFatalFailure() through ASSERT_NO_FATAL_FAILURE
  return d;
}

std::vector<double> geometric(double from, double to, int n) {
  std::vector<double> v(n);
  for (int i = 0; i < n; ++i) v[i] = from * std::pow(to / from, double(i) / (n - 1));
  return v;
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

TEST(RenderLossPng, IhdrFields) {
  Decoded d;
  ASSERT_NO_FATAL_FAILURE(decode(render_loss_png({3, 2, 1}, 321, 77), &d));
  EXPECT_EQ(d.width, 321u);
  EXPECT_EQ(d.height, 77u);
  EXPECT_EQ(d.depth, 8);
  EXPECT_EQ(d.color, 2);  // RGB
  EXPECT_EQ(d.interlace, 0);
}

TEST(RenderLossPng, IsCompressed) {
  // A long noisy run at the default size: the raw image is 640·360·3 = 691,200 bytes.
  std::vector<double> losses(5000);
  for (size_t i = 0; i < losses.size(); ++i) losses[i] = 1.0 / (1 + 0.01 * double(i)) + 0.02 * double((i * 7919) % 13);
  const std::string png = render_loss_png(losses);
  EXPECT_LT(png.size(), 40000u) << "the loss plot should be a small file";
  Decoded d;
  ASSERT_NO_FATAL_FAILURE(decode(png, &d));
  EXPECT_EQ(d.width, 640u);
  EXPECT_EQ(d.height, 360u);
}

TEST(RenderLossPng, WhiteBackgroundAndCurveColour) {
  Decoded d;
  ASSERT_NO_FATAL_FAILURE(d = render(geometric(5, 1, 50)));
  EXPECT_TRUE(is(d, 0, 0, kPlotBackground));
  EXPECT_TRUE(is(d, int(d.width) - 1, 0, kPlotBackground));
  EXPECT_TRUE(is(d, int(d.width) - 1, int(d.height) - 1, kPlotBackground));
  EXPECT_GT(count(d, kPlotBackground), size_t(d.width) * d.height / 2);
  EXPECT_GT(count(d, kPlotCurve), 100u);
  EXPECT_GT(count(d, kPlotGrid), 100u);
  EXPECT_GT(count(d, kPlotAxis), 600u);
}

TEST(RenderLossPng, DecreasingLossesStartHigherThanTheyEnd) {
  for (const auto& losses : {geometric(5, 1, 30), geometric(1000, 1, 30), std::vector<double>{-1, -2, -3}}) {
    Decoded d;
    ASSERT_NO_FATAL_FAILURE(d = render(losses));
    const auto [first, last] = curve_columns(d);
    ASSERT_GE(first, 0);
    ASSERT_GT(last, first);
    EXPECT_LT(curve_row(d, first), curve_row(d, last));  // smaller row index = higher up
  }
}

// 1000 -> 1 spans three decades: log10 scale, so a geometric decay is a
// straight line and its middle point sits half way down.
TEST(RenderLossPng, WideRangeUsesLogScale) {
  Decoded d;
  ASSERT_NO_FATAL_FAILURE(d = render(geometric(1000, 1, 101)));
  const auto [first, last] = curve_columns(d);
  const double top = curve_row(d, first), bottom = curve_row(d, last);
  const double mid = curve_row(d, (first + last) / 2);
  EXPECT_NEAR((mid - top) / (bottom - top), 0.5, 0.05);
}

// 4 -> 1 spans less than a factor of 10: linear scale (ticks 1, 2, 3, 4), so
// the middle point (2) sits a third of the way up from the last.
TEST(RenderLossPng, NarrowRangeUsesLinearScale) {
  Decoded d;
  ASSERT_NO_FATAL_FAILURE(d = render(geometric(4, 1, 101)));
  const auto [first, last] = curve_columns(d);
  const double top = curve_row(d, first), bottom = curve_row(d, last);
  const double mid = curve_row(d, (first + last) / 2);
  EXPECT_NEAR((mid - top) / (bottom - top), 2.0 / 3.0, 0.05);
}

TEST(RenderLossPng, NanAndInfPointsAreSkipped) {
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  std::vector<double> losses = geometric(3, 1, 100);
  for (int i = 40; i < 60; ++i) losses[i] = (i % 2) ? nan : inf;
  losses[0] = nan;
  losses[99] = -inf;
  Decoded d;
  ASSERT_NO_FATAL_FAILURE(d = render(losses));
  EXPECT_GT(count(d, kPlotCurve), 100u);
  // No curve between points 39 and 60: the line breaks at the gap.
  const auto [first, last] = curve_columns(d);
  const double per_step = double(last - first) / 97;  // points 1..98 are drawn
  for (int x = first + int(per_step * 39) + 3; x <= first + int(per_step * 58) - 3; ++x)
    EXPECT_TRUE(std::isnan(curve_row(d, x))) << "column " << x;
}

TEST(RenderLossPng, AllNanGivesNoCurve) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  Decoded d;
  ASSERT_NO_FATAL_FAILURE(d = render({nan, nan, nan}));
  EXPECT_EQ(count(d, kPlotCurve), 0u);
}

TEST(RenderLossPng, EmptyInputGivesBlankChart) {
  Decoded d;
  ASSERT_NO_FATAL_FAILURE(d = render({}));
  EXPECT_EQ(count(d, kPlotCurve), 0u);
  EXPECT_GT(count(d, kPlotAxis), 0u);
  EXPECT_GT(count(d, kPlotGrid), 0u);
}

TEST(RenderLossPng, SinglePointAndConstantLosses) {
  Decoded one;
  ASSERT_NO_FATAL_FAILURE(one = render({0.7}));
  EXPECT_EQ(count(one, kPlotCurve), 4u);  // one 2x2 dot
  Decoded flat;
  ASSERT_NO_FATAL_FAILURE(flat = render(std::vector<double>(20, 0.25)));
  const auto [first, last] = curve_columns(flat);
  for (int x = first; x <= last; ++x) EXPECT_EQ(curve_row(flat, x), curve_row(flat, first));
}

TEST(RenderLossPng, LabelsAreDrawnWhenThereIsRoom) {
  // Labels start 2 px from the left edge; tick marks and the axis lie further right.
  auto left_strip_ink = [](const Decoded& d) {
    size_t n = 0;
    for (uint32_t y = 0; y < d.height; ++y)
      for (int x = 0; x < 8; ++x) n += is(d, x, int(y), kPlotAxis);
    return n;
  };
  Decoded big, tiny;
  ASSERT_NO_FATAL_FAILURE(big = render({12.5, 3, 1}));
  EXPECT_GT(left_strip_ink(big), 0u);
  ASSERT_NO_FATAL_FAILURE(tiny = render({12.5, 3, 1}, 16, 16));
  EXPECT_GT(count(tiny, kPlotCurve), 0u);
}

TEST(RenderLossPng, ExtremeValuesAndManyPoints) {
  const double big = std::numeric_limits<double>::max(), denorm = std::numeric_limits<double>::denorm_min();
  for (const auto& losses : {std::vector<double>{big, -big, 0, 1}, std::vector<double>{denorm, 1, big},
                             std::vector<double>{1e16, 1e16 + 2}, std::vector<double>{0, 0}}) {
    Decoded d;
    ASSERT_NO_FATAL_FAILURE(d = render(losses, 64, 48));
    EXPECT_GT(count(d, kPlotCurve), 0u);
  }
  std::vector<double> many(200000);
  for (size_t i = 0; i < many.size(); ++i) many[i] = 1.0 / (1 + i) + 0.01 * ((i * 7919) % 13);
  Decoded d;
  ASSERT_NO_FATAL_FAILURE(d = render(many, 300, 200));
  EXPECT_GT(count(d, kPlotCurve), 300u);
}

// Axis-coloured ink in rows [y0, y1) and columns [x0, x1).
size_t ink(const Decoded& d, int x0, int x1, int y0, int y1) {
  size_t n = 0;
  for (int y = std::max(0, y0); y < std::min(int(d.height), y1); ++y)
    for (int x = std::max(0, x0); x < std::min(int(d.width), x1); ++x) n += is(d, x, y, kPlotAxis);
  return n;
}

// Rows of the y grid lines (a grey run across the middle column).
std::vector<int> grid_rows(const Decoded& d) {
  std::vector<int> rows;
  for (uint32_t y = 0; y < d.height; ++y)
    if (is(d, int(d.width) / 2, int(y), kPlotGrid)) rows.push_back(int(y));
  return rows;
}

TEST(RenderLossPng, EveryYTickIsLabelled) {
  Decoded d;
  ASSERT_NO_FATAL_FAILURE(d = render({5.0, 4.0, 3.2, 2.5, 1.7, 1.1}));
  const std::vector<int> rows = grid_rows(d);
  ASSERT_GE(rows.size(), 4u);
  // The y axis: the first column inked over a third of the height; the tick marks (4 px at
  // this size) lie just left of it, the labels left of those.
  int axis = -1;
  for (int x = 0; x < int(d.width) && axis < 0; ++x)
    if (ink(d, x, x + 1, 0, int(d.height)) > d.height / 3) axis = x;
  ASSERT_GT(axis, 6);
  for (int y : rows) EXPECT_GT(ink(d, 0, axis - 5, y - 5, y + 5), 0u) << "no label at the grid line of row " << y;
}

TEST(RenderLossPng, XAxisHasSeveralLabelsAndTitles) {
  std::vector<double> losses(1000);
  for (size_t i = 0; i < losses.size(); ++i) losses[i] = 2.0 - double(i) / 1000;
  Decoded d;
  ASSERT_NO_FATAL_FAILURE(d = render(losses));
  // The bottom band (under the axis): labels then the title; count separate runs of ink columns.
  const int h = int(d.height);
  int groups = 0;
  bool in_group = false;
  for (int x = 0; x < int(d.width); ++x) {
    const bool has = ink(d, x, x + 1, h - 24, h - 17) > 0;
    if (has && !in_group) ++groups;
    in_group = has;
  }
  EXPECT_GE(groups, 4) << "x tick labels";
  EXPECT_GT(ink(d, 0, int(d.width), h - 13, h), 0u) << "x axis title";
  EXPECT_GT(ink(d, 0, 60, 0, 14), 0u) << "y axis title";
}

TEST(RenderLossPng, LogScaleIsMarkedInTheTitle) {
  // The y title is "loss" on a linear scale, "loss (log scale)" on a log one: longer ink.
  auto title_width = [](const Decoded& d) {
    int last = -1;
    for (int x = 0; x < int(d.width); ++x)
      if (ink(d, x, x + 1, 0, 14) > 0) last = x;
    return last;
  };
  Decoded lin, log;
  ASSERT_NO_FATAL_FAILURE(lin = render({3, 2, 1}));
  ASSERT_NO_FATAL_FAILURE(log = render(geometric(1000, 0.01, 50)));
  EXPECT_GT(title_width(log), 2 * title_width(lin));
}

TEST(RenderLossPng, RejectsTinyImages) {
  EXPECT_THROW(render_loss_png({1.0}, 15, 100), loom::Error);
  EXPECT_THROW(render_loss_png({1.0}, 100, 15), loom::Error);
  EXPECT_THROW(render_loss_png({1.0}, -1, 100), loom::Error);
  EXPECT_NO_THROW(render_loss_png({1.0}, 16, 16));
}

}  // namespace
}  // namespace loom::trainer
