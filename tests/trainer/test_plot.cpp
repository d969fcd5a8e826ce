// Loss-curve PNGs: the file structure (signature, chunk CRCs, IHDR), the zlib
// stream of stored deflate blocks (lengths, Adler-32), and the picture itself
// (white background, a dark blue curve going the right way, log/linear y
// scale, NaN/Inf gaps), all decoded here independently of trainer/plot.cpp.
#include <gtest/gtest.h>

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
// An independent PNG reader for what render_loss_png writes.
// ---------------------------------------------------------------------------

// Bitwise CRC-32 (no table), as in the PNG specification's annex.
uint32_t bitwise_crc32(const uint8_t* p, size_t n) {
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

// Adler-32, one modulo per byte.
uint32_t slow_adler32(const std::vector<uint8_t>& d) {
  uint32_t a = 1, b = 0;
  for (uint8_t x : d) {
    a = (a + x) % 65521;
    b = (b + a) % 65521;
  }
  return (b << 16) | a;
}

uint32_t be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3];
}

struct Decoded {
  uint32_t width = 0, height = 0;
  uint8_t depth = 0, color = 0, compression = 0, filter = 0, interlace = 0;
  std::vector<std::string> chunk_types;
  size_t stored_blocks = 0;
  std::vector<uint8_t> raw;  // filter byte + RGB row, per row
};

// Splits the file into chunks (checking each CRC), reads IHDR and gathers the IDAT data.
void read_chunks(const std::string& png, Decoded* d, std::vector<uint8_t>* idat) {
  ASSERT_GE(png.size(), 8u);
  ASSERT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  const auto* p = reinterpret_cast<const uint8_t*>(png.data());
  for (size_t pos = 8; pos < png.size();) {
    ASSERT_LE(pos + 12, png.size()) << "truncated chunk header";
    const uint32_t len = be32(p + pos);
    ASSERT_LE(pos + 12 + len, png.size()) << "truncated chunk";
    const std::string type(png.data() + pos + 4, 4);
    EXPECT_EQ(be32(p + pos + 8 + len), bitwise_crc32(p + pos + 4, 4 + len)) << "CRC of " << type;
    d->chunk_types.push_back(type);
    if (type == "IHDR") {
      ASSERT_EQ(len, 13u);
      d->width = be32(p + pos + 8);
      d->height = be32(p + pos + 12);
      d->depth = p[pos + 16], d->color = p[pos + 17], d->compression = p[pos + 18];
      d->filter = p[pos + 19], d->interlace = p[pos + 20];
    } else if (type == "IDAT") {
      idat->insert(idat->end(), p + pos + 8, p + pos + 8 + len);
    }
    pos += 12 + len;
  }
}

// Unpacks a zlib stream that must consist of stored deflate blocks only.
void inflate_stored(const std::vector<uint8_t>& z, Decoded* d) {
  ASSERT_GE(z.size(), 2u + 5u + 4u);
  EXPECT_EQ(z[0], 0x78);
  EXPECT_EQ(z[1], 0x01);
  EXPECT_EQ((z[0] * 256 + z[1]) % 31, 0) << "zlib FCHECK";
  size_t pos = 2;
  for (bool final_block = false; !final_block;) {
    ASSERT_LE(pos + 5, z.size()) << "truncated block header";
    final_block = z[pos] & 1;
    ASSERT_EQ((z[pos] >> 1) & 3, 0) << "BTYPE must be 00 (stored)";
    const uint16_t len = uint16_t(z[pos + 1] | (z[pos + 2] << 8));
    const uint16_t nlen = uint16_t(z[pos + 3] | (z[pos + 4] << 8));
    ASSERT_EQ(uint16_t(~len), nlen);
    ASSERT_LE(pos + 5 + len, z.size()) << "truncated block";
    d->raw.insert(d->raw.end(), z.begin() + pos + 5, z.begin() + pos + 5 + len);
    pos += 5 + len;
    ++d->stored_blocks;
  }
  ASSERT_EQ(pos + 4, z.size()) << "Adler-32 must follow the last block";
  EXPECT_EQ(be32(z.data() + pos), slow_adler32(d->raw));
}

// Full decode with every structural check; use under ASSERT_NO_FATAL_FAILURE.
void decode(const std::string& png, Decoded* d) {
  std::vector<uint8_t> idat;
  ASSERT_NO_FATAL_FAILURE(read_chunks(png, d, &idat));
  ASSERT_GE(d->chunk_types.size(), 3u);
  EXPECT_EQ(d->chunk_types.front(), "IHDR");
  EXPECT_EQ(d->chunk_types.back(), "IEND");
  ASSERT_NO_FATAL_FAILURE(inflate_stored(idat, d));
  const size_t stride = 1 + 3 * size_t(d->width);
  ASSERT_EQ(d->raw.size(), size_t(d->height) * stride);
  for (size_t y = 0; y < d->height; ++y) EXPECT_EQ(d->raw[y * stride], 0) << "filter byte of row " << y;
}

// ---------------------------------------------------------------------------
// Looking at the picture
// ---------------------------------------------------------------------------

bool is(const Decoded& d, int x, int y, Rgb c) {
  const uint8_t* p = &d.raw[size_t(y) * (1 + 3 * size_t(d.width)) + 1 + 3 * size_t(x)];
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

TEST(RenderLossPng, StartsWithSignatureAndChunksVerify) {
  const std::string png = render_loss_png({3.0, 2.0, 1.5, 1.2}, 200, 120);
  EXPECT_EQ(png.compare(0, 8, "\x89PNG\r\n\x1a\n"), 0);
  Decoded d;
  ASSERT_NO_FATAL_FAILURE(decode(png, &d));
  EXPECT_EQ(d.chunk_types, (std::vector<std::string>{"IHDR", "IDAT", "IEND"}));
}

TEST(RenderLossPng, IhdrFields) {
  Decoded d;
  ASSERT_NO_FATAL_FAILURE(d = render({1, 0.5}, 321, 77));
  EXPECT_EQ(d.width, 321u);
  EXPECT_EQ(d.height, 77u);
  EXPECT_EQ(d.depth, 8);
  EXPECT_EQ(d.color, 2);  // RGB
  EXPECT_EQ(d.compression, 0);
  EXPECT_EQ(d.filter, 0);
  EXPECT_EQ(d.interlace, 0);
}

TEST(RenderLossPng, DefaultSizeUsesSeveralStoredBlocks) {
  Decoded d;
  ASSERT_NO_FATAL_FAILURE(d = render({2, 1}));  // 640 x 360 by default
  EXPECT_EQ(d.width, 640u);
  EXPECT_EQ(d.height, 360u);
  EXPECT_EQ(d.raw.size(), 360u * (1 + 3 * 640));
  EXPECT_EQ(d.stored_blocks, (d.raw.size() + 65534) / 65535);  // full blocks but the last
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

TEST(RenderLossPng, RejectsTinyImages) {
  EXPECT_THROW(render_loss_png({1.0}, 15, 100), loom::Error);
  EXPECT_THROW(render_loss_png({1.0}, 100, 15), loom::Error);
  EXPECT_THROW(render_loss_png({1.0}, -1, 100), loom::Error);
  EXPECT_NO_THROW(render_loss_png({1.0}, 16, 16));
}

}  // namespace
}  // namespace loom::trainer
