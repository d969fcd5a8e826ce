// Loss-curve PNG writer: see plot.h. Three parts, top to bottom: the y scale
// (linear or log10, with "nice" ticks), a small raster (grid, axes, ticks,
// 3x5 pixel labels, the curve) and the PNG encoder (stored deflate blocks).
#include "trainer/plot.h"

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdio>

#include "tensor/error.h"

namespace loom::trainer {
namespace {

// ---------------------------------------------------------------------------
// Raster
// ---------------------------------------------------------------------------

// An RGB image, 3 bytes per pixel, rows top to bottom.
struct Image {
  int w, h;
  std::vector<uint8_t> px;

  Image(int width, int height, Rgb fill) : w(width), h(height), px(size_t(width) * height * 3) {
    for (size_t i = 0; i < px.size(); i += 3) {
      px[i] = fill.r;
      px[i + 1] = fill.g;
      px[i + 2] = fill.b;
    }
  }
  // Sets one pixel; pixels outside the image are ignored.
  void set(int x, int y, Rgb c) {
    if (x < 0 || y < 0 || x >= w || y >= h) return;
    uint8_t* p = &px[(size_t(y) * w + x) * 3];
    p[0] = c.r;
    p[1] = c.g;
    p[2] = c.b;
  }
  void hline(int x0, int x1, int y, Rgb c) {
    for (int x = x0; x <= x1; ++x) set(x, y, c);
  }
  void vline(int x, int y0, int y1, Rgb c) {
    for (int y = y0; y <= y1; ++y) set(x, y, c);
  }
};

// The plot area [left, left + w) x [top, top + h); the axes lie just outside
// it (x = left - 1 and y = top + h).
struct Rect {
  int left, top, w, h;
  int right() const { return left + w - 1; }   // last column inside
  int bottom() const { return top + h - 1; }   // last row inside
};

// ---------------------------------------------------------------------------
// 3x5 pixel font: digits, '.', '-', 'e' (enough for "%g" numbers).
// ---------------------------------------------------------------------------

// Five rows of three bits each (4 = left column, 1 = right column); null
// for a character the font lacks (drawn as a blank).
const uint8_t* glyph(char c) {
  static const uint8_t kDigits[10][5] = {
      {7, 5, 5, 5, 7}, {2, 6, 2, 2, 7}, {7, 1, 7, 4, 7}, {7, 1, 7, 1, 7}, {5, 5, 7, 1, 1},
      {7, 4, 7, 1, 7}, {7, 4, 7, 5, 7}, {7, 1, 1, 1, 1}, {7, 5, 7, 5, 7}, {7, 5, 7, 1, 7}};
  static const uint8_t kDot[5] = {0, 0, 0, 0, 2};
  static const uint8_t kMinus[5] = {0, 0, 7, 0, 0};
  static const uint8_t kE[5] = {0, 7, 7, 4, 7};
  if (c >= '0' && c <= '9') return kDigits[c - '0'];
  if (c == '.') return kDot;
  if (c == '-') return kMinus;
  if (c == 'e') return kE;
  return nullptr;
}

// Width in pixels of `s` drawn at `scale` (4 columns per character, the last
// one's gap dropped).
int text_width(const std::string& s, int scale) {
  return s.empty() ? 0 : int(s.size()) * 4 * scale - scale;
}

// Draws `s` with its top-left corner at (x, y), each font pixel a scale x scale block.
void draw_text(Image& img, int x, int y, const std::string& s, int scale, Rgb c) {
  for (char ch : s) {
    if (const uint8_t* g = glyph(ch)) {
      for (int row = 0; row < 5; ++row)
        for (int col = 0; col < 3; ++col)
          if (g[row] & (4 >> col))
            for (int dy = 0; dy < scale; ++dy)
              for (int dx = 0; dx < scale; ++dx) img.set(x + col * scale + dx, y + row * scale + dy, c);
    }
    x += 4 * scale;
  }
}

// "%.3g" with a compact exponent ("1e-05" -> "1e-5", "1e+10" -> "1e10").
std::string format_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  std::string s = buf;
  const size_t e = s.find('e');
  if (e == std::string::npos) return s;
  std::string mant = s.substr(0, e + 1), exp = s.substr(e + 1);
  std::string sign = exp[0] == '-' ? "-" : "";
  if (exp[0] == '+' || exp[0] == '-') exp.erase(0, 1);
  exp.erase(0, std::min(exp.find_first_not_of('0'), exp.size() - 1));
  return mant + sign + exp;
}

// ---------------------------------------------------------------------------
// Y scale
// ---------------------------------------------------------------------------

// The y axis in plotted units (log10(loss) on a log scale): the range
// [lo, hi] and the grid lines, in plotted units too.
struct Scale {
  bool log = false;
  double lo = 0, hi = 1;
  std::vector<double> ticks;

  double to_plot(double v) const { return log ? std::log10(v) : v; }
  double to_value(double p) const { return log ? std::pow(10.0, p) : p; }
};

// 1, 2 or 5 times a power of ten, the smallest one >= raw (raw > 0).
double nice_step(double raw) {
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double norm = raw / mag;
  return (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10) * mag;
}

// Linear scale over [mn, mx], widened to whole multiples of a nice step
// (about five ticks); a flat range is widened by 10% (or 1 around 0) first.
Scale linear_scale(double mn, double mx) {
  if (mx - mn <= 1e-12 * std::max(std::fabs(mn), std::fabs(mx))) {
    const double d = mn != 0 ? std::fabs(mn) * 0.1 : 1.0;
    mn = std::max(mn - d, -DBL_MAX);
    mx = std::min(mx + d, DBL_MAX);
  }
  const double step = nice_step((mx * 0.5 - mn * 0.5) / 2);  // span / 4 without overflow
  Scale s;
  s.lo = std::max(std::floor(mn / step) * step, -DBL_MAX);
  s.hi = std::min(std::ceil(mx / step) * step, DBL_MAX);
  for (int i = 0; i <= 50; ++i) {
    const double t = s.lo + i * step;
    if (t > s.hi + step * 1e-9) break;
    s.ticks.push_back(std::min(t, s.hi));
  }
  return s;
}

// Log10 scale over [mn, mx] (0 < mn, mx / mn > 10): whole decades, a grid
// line every decade (every few decades when there are more than ten).
Scale log_scale(double mn, double mx) {
  Scale s;
  s.log = true;
  s.lo = std::floor(std::log10(mn));
  s.hi = std::ceil(std::log10(mx));
  const double every = std::max(1.0, std::ceil((s.hi - s.lo) / 10));
  for (double t = s.lo; t <= s.hi; t += every) s.ticks.push_back(t);
  return s;
}

// The y scale for the finite values in `losses` (0..1 when there are none).
Scale choose_scale(const std::vector<double>& losses) {
  double mn = INFINITY, mx = -INFINITY;
  for (double v : losses) {
    if (!std::isfinite(v)) continue;
    mn = std::min(mn, v);
    mx = std::max(mx, v);
  }
  if (mn > mx) return linear_scale(0, 1);           // no finite point: blank chart
  if (mn > 0 && mx / mn > 10) return log_scale(mn, mx);
  return linear_scale(mn, mx);
}

// ---------------------------------------------------------------------------
// Layout and drawing
// ---------------------------------------------------------------------------

// Everything the drawing functions share.
struct Chart {
  Rect area;
  Scale scale;
  int font = 1;          // font scale (pixels per font pixel)
  int tick = 3;          // tick mark length
  bool labels = false;   // whether the labels fit
  std::string y_lo, y_hi, x_last;
};

// Places the plot area, leaving room for the labels when they fit (plot area
// at least half the image each way), else thin margins and no labels.
Chart layout(const Scale& scale, size_t n, int width, int height) {
  Chart c;
  c.scale = scale;
  c.font = (width >= 320 && height >= 200) ? 2 : 1;
  c.tick = 2 + c.font;
  c.y_lo = format_number(scale.to_value(scale.lo));
  c.y_hi = format_number(scale.to_value(scale.hi));
  c.x_last = n > 0 ? std::to_string(n) : "";
  const int label_w = std::max(text_width(c.y_lo, c.font), text_width(c.y_hi, c.font));
  const int left = 2 + label_w + 2 + c.tick + 1, right = 8;
  const int top = (5 * c.font) / 2 + 3, bottom = 1 + c.tick + 2 + 5 * c.font + 2;
  c.labels = width - left - right >= width / 2 && height - top - bottom >= height / 2;
  if (c.labels)
    c.area = {left, top, width - left - right, height - top - bottom};
  else
    c.area = {c.tick + 2, 3, width - c.tick - 5, height - c.tick - 5};
  return c;
}

// Row of plotted value p (already in plotted units); the halves avoid
// overflow when hi - lo exceeds DBL_MAX.
int row_of(const Chart& c, double p) {
  const Scale& s = c.scale;
  const double f = std::clamp((p * 0.5 - s.lo * 0.5) / (s.hi * 0.5 - s.lo * 0.5), 0.0, 1.0);
  return c.area.top + int(std::lround((1 - f) * (c.area.h - 1)));
}

// Column of point i (0-based) out of n.
int col_of(const Chart& c, size_t i, size_t n) {
  if (n <= 1) return c.area.left + (c.area.w - 1) / 2;
  return c.area.left + int(std::lround(double(i) * (c.area.w - 1) / double(n - 1)));
}

// Grid lines and tick marks at the y ticks, tick marks at nice steps along x
// (and at the last step), then the two axes.
void draw_frame(Image& img, const Chart& c, size_t n) {
  const Rect& a = c.area;
  for (double t : c.scale.ticks) {
    const int y = row_of(c, t);
    img.hline(a.left, a.right(), y, kPlotGrid);
    img.hline(a.left - 1 - c.tick, a.left - 2, y, kPlotAxis);
  }
  if (n > 0) {
    const size_t step = n > 1 ? size_t(std::max(1.0, nice_step(double(n - 1) / 5))) : 1;
    std::vector<size_t> steps = {1, n};
    for (size_t s = step; s < n && steps.size() < 64; s += step) steps.push_back(s);
    for (size_t s : steps) img.vline(col_of(c, s - 1, n), a.top + a.h + 1, a.top + a.h + c.tick, kPlotAxis);
  }
  img.vline(a.left - 1, a.top, a.top + a.h, kPlotAxis);
  img.hline(a.left - 1, a.right(), a.top + a.h, kPlotAxis);
}

// The min/max y values left of the y axis and the last step number under
// the right end of the x axis.
void draw_labels(Image& img, const Chart& c) {
  if (!c.labels) return;
  const Rect& a = c.area;
  const int f = c.font, x_end = a.left - 1 - c.tick - 2;
  draw_text(img, x_end - text_width(c.y_hi, f), a.top - (5 * f) / 2, c.y_hi, f, kPlotAxis);
  draw_text(img, x_end - text_width(c.y_lo, f), a.bottom() - (5 * f) / 2, c.y_lo, f, kPlotAxis);
  draw_text(img, a.right() + 1 - text_width(c.x_last, f), a.top + a.h + 1 + c.tick + 2, c.x_last, f, kPlotAxis);
}

// A 2x2 pixel dot with its top-left at (x, y), moved inside the plot area.
void dot(Image& img, const Rect& a, int x, int y) {
  x = std::min(x, a.right() - 1);
  y = std::min(y, a.bottom() - 1);
  for (int dy = 0; dy < 2; ++dy)
    for (int dx = 0; dx < 2; ++dx) img.set(x + dx, y + dy, kPlotCurve);
}

// A 2-px thick line from (x0, y0) to (x1, y1) (Bresenham, a dot per step).
void thick_line(Image& img, const Rect& a, int x0, int y0, int x1, int y1) {
  const int dx = std::abs(x1 - x0), dy = -std::abs(y1 - y0);
  const int sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
  for (int err = dx + dy;;) {
    dot(img, a, x0, y0);
    if (x0 == x1 && y0 == y1) return;
    const int e2 = 2 * err;
    if (e2 >= dy) { err += dy; x0 += sx; }
    if (e2 <= dx) { err += dx; y0 += sy; }
  }
}

// The curve: consecutive finite points joined; a NaN/Inf point is skipped
// and breaks the line (an isolated finite point is drawn as a dot).
void draw_curve(Image& img, const Chart& c, const std::vector<double>& losses) {
  bool have_prev = false;
  int px = 0, py = 0;
  for (size_t i = 0; i < losses.size(); ++i) {
    if (!std::isfinite(losses[i])) {
      have_prev = false;
      continue;
    }
    const int x = col_of(c, i, losses.size()), y = row_of(c, c.scale.to_plot(losses[i]));
    if (have_prev) thick_line(img, c.area, px, py, x, y);
    else dot(img, c.area, x, y);
    px = x, py = y, have_prev = true;
  }
}

// ---------------------------------------------------------------------------
// PNG encoding
// ---------------------------------------------------------------------------

// CRC-32 (IEEE, reflected, polynomial 0xEDB88320) with a 256-entry table.
uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc = 0) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

// Adler-32 of the uncompressed data (zlib trailer), reduced every 5552
// bytes, the most that cannot overflow 32 bits.
uint32_t adler32(const std::vector<uint8_t>& data) {
  uint32_t a = 1, b = 0;
  for (size_t i = 0; i < data.size();) {
    const size_t end = std::min(data.size(), i + 5552);
    for (; i < end; ++i) {
      a += data[i];
      b += a;
    }
    a %= 65521;
    b %= 65521;
  }
  return (b << 16) | a;
}

void put_u32(std::string& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(char((v >> shift) & 0xFF));
}

// Appends one chunk: length, type, data, CRC-32 of type + data.
void put_chunk(std::string& out, const char type[4], const std::string& data) {
  put_u32(out, uint32_t(data.size()));
  const size_t start = out.size();
  out.append(type, 4);
  out += data;
  put_u32(out, crc32(reinterpret_cast<const uint8_t*>(out.data() + start), out.size() - start));
}

// A zlib stream of stored (uncompressed) deflate blocks of at most 65535
// bytes each: header 78 01, blocks, Adler-32 (big-endian).
std::string zlib_stored(const std::vector<uint8_t>& raw) {
  std::string z = {char(0x78), char(0x01)};
  size_t pos = 0;
  do {
    const size_t len = std::min<size_t>(raw.size() - pos, 65535);
    const bool final_block = pos + len == raw.size();
    z.push_back(char(final_block ? 1 : 0));  // BFINAL, BTYPE = 00 (stored)
    const uint16_t l = uint16_t(len), nl = uint16_t(~l);
    z += {char(l & 0xFF), char(l >> 8), char(nl & 0xFF), char(nl >> 8)};
    z.append(reinterpret_cast<const char*>(raw.data() + pos), len);
    pos += len;
  } while (pos < raw.size());
  put_u32(z, adler32(raw));
  return z;
}

// PNG file bytes of `img`: signature, IHDR (8-bit RGB), one IDAT (filter
// byte 0 before each row), IEND.
std::string encode_png(const Image& img) {
  std::string ihdr;
  put_u32(ihdr, uint32_t(img.w));
  put_u32(ihdr, uint32_t(img.h));
  ihdr += {char(8), char(2), char(0), char(0), char(0)};  // depth, RGB, deflate, filter, no interlace
  std::vector<uint8_t> raw;
  const size_t row = size_t(img.w) * 3;
  raw.reserve(size_t(img.h) * (row + 1));
  for (int y = 0; y < img.h; ++y) {
    raw.push_back(0);  // filter type None
    raw.insert(raw.end(), img.px.begin() + y * row, img.px.begin() + (y + 1) * row);
  }
  std::string png = "\x89PNG\r\n\x1a\n";
  put_chunk(png, "IHDR", ihdr);
  put_chunk(png, "IDAT", zlib_stored(raw));
  put_chunk(png, "IEND", "");
  return png;
}

}  // namespace

std::string render_loss_png(const std::vector<double>& losses, int width, int height) {
  LOOM_CHECK(width >= 16 && height >= 16 && width <= 16384 && height <= 16384,
             "render_loss_png: width and height must be in [16, 16384], got ", width, "x", height);
  const Chart chart = layout(choose_scale(losses), losses.size(), width, height);
  Image img(width, height, kPlotBackground);
  draw_frame(img, chart, losses.size());
  draw_labels(img, chart);
  draw_curve(img, chart, losses);
  return encode_png(img);
}

}  // namespace loom::trainer
