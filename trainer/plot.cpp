// Loss-curve PNG writer: see plot.h. Three parts, top to bottom: the y scale
// (linear or log10, with "nice" ticks), a small raster (grid, axes, ticks,
// 3x5 pixel labels and axis titles, the curve) and the PNG encoding (io/png.h, libpng).
#include "trainer/plot.h"

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "io/png.h"
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
// 3x5 pixel font: digits, '.', '-', 'e' (enough for "%g" numbers) and the letters of the
// axis titles ("step", "loss (log scale)").
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
  struct Letter {
    char c;
    uint8_t rows[5];
  };
  static const Letter kLetters[] = {{'s', {0, 3, 4, 1, 6}}, {'t', {2, 7, 2, 2, 3}}, {'p', {0, 7, 5, 7, 4}},
                                    {'l', {6, 2, 2, 2, 7}}, {'o', {0, 7, 5, 5, 7}}, {'g', {7, 4, 5, 5, 7}},
                                    {'c', {0, 7, 4, 4, 7}}, {'a', {0, 6, 1, 7, 7}}, {'(', {1, 2, 2, 2, 1}},
                                    {')', {4, 2, 2, 2, 4}}};
  if (c >= '0' && c <= '9') return kDigits[c - '0'];
  if (c == '.') return kDot;
  if (c == '-') return kMinus;
  if (c == 'e') return kE;
  for (const Letter& l : kLetters)
    if (l.c == c) return l.rows;
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
  std::vector<size_t> x_ticks;  // steps (1-based) with a tick mark on the x axis
};

// Steps with a tick on the x axis: 1, every nice step, and the last.
std::vector<size_t> x_tick_steps(size_t n) {
  if (n == 0) return {};
  const size_t step = n > 1 ? size_t(std::max(1.0, nice_step(double(n - 1) / 5))) : 1;
  std::vector<size_t> steps = {1};
  for (size_t s = step; s < n && steps.size() < 64; s += step)
    if (s > 1) steps.push_back(s);
  if (n > 1) steps.push_back(n);
  return steps;
}

std::string y_label(const Scale& s, double t) { return format_number(s.to_value(t)); }

std::string y_title(const Scale& s) { return s.log ? "loss (log scale)" : "loss"; }

// Places the plot area, leaving room for the labels when they fit (plot area
// at least half the image each way), else thin margins and no labels.
Chart layout(const Scale& scale, size_t n, int width, int height) {
  Chart c;
  c.scale = scale;
  c.font = (width >= 320 && height >= 200) ? 2 : 1;
  c.tick = 2 + c.font;
  c.x_ticks = x_tick_steps(n);
  int label_w = 0;
  for (double t : scale.ticks) label_w = std::max(label_w, text_width(y_label(scale, t), c.font));
  const int text_h = 5 * c.font;
  // Left: y labels; top: the y title above the axis; bottom: x labels, then the x title.
  const int left = 2 + label_w + 2 + c.tick + 1, right = 8 + text_width(std::to_string(n), c.font) / 2;
  const int top = 3 + text_h + 3 + text_h / 2, bottom = 1 + c.tick + 2 + text_h + 3 + text_h + 2;
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
  for (size_t s : c.x_ticks) img.vline(col_of(c, s - 1, n), a.top + a.h + 1, a.top + a.h + c.tick, kPlotAxis);
  img.vline(a.left - 1, a.top, a.top + a.h, kPlotAxis);
  img.hline(a.left - 1, a.right(), a.top + a.h, kPlotAxis);
}

// The value of every y tick left of the y axis and the step of every x tick under the x axis
// (a label that would touch the previous one is left out; the first and last always come), the
// y title ("loss", "loss (log scale)") above the y axis and the x title ("step") under the labels.
void draw_labels(Image& img, const Chart& c, size_t n) {
  if (!c.labels) return;
  const Rect& a = c.area;
  const int f = c.font, text_h = 5 * f, x_end = a.left - 1 - c.tick - 2;
  int last_top = INT_MAX;  // y ticks run bottom to top
  for (double t : c.scale.ticks) {
    const int top = row_of(c, t) - text_h / 2;
    if (top + text_h + f > last_top) continue;
    const std::string label = y_label(c.scale, t);
    draw_text(img, x_end - text_width(label, f), top, label, f, kPlotAxis);
    last_top = top;
  }
  const int label_y = a.top + a.h + 1 + c.tick + 2;
  int last_right = INT_MIN;
  for (size_t i = 0; i < c.x_ticks.size(); ++i) {
    const std::string label = std::to_string(c.x_ticks[i]);
    const int w = text_width(label, f), x = col_of(c, c.x_ticks[i] - 1, n) - w / 2;
    const bool last = i + 1 == c.x_ticks.size();
    if (x < last_right + 3 * f && !last) continue;
    draw_text(img, x, label_y, label, f, kPlotAxis);
    last_right = x + w;
  }
  const std::string x_title = "step";
  draw_text(img, a.left + (a.w - text_width(x_title, f)) / 2, label_y + text_h + 3, x_title, f, kPlotAxis);
  draw_text(img, 2, 3, y_title(c.scale), f, kPlotAxis);
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

// PNG file bytes of `img` (8-bit RGB), compressed by libpng / zlib (io/png.h).
std::string encode_png(const Image& img) {
  io::RgbImage rgb;
  rgb.width = img.w, rgb.height = img.h, rgb.rgb = img.px;
  return io::encode_png(rgb);
}

}  // namespace

std::string render_loss_png(const std::vector<double>& losses, int width, int height) {
  LOOM_CHECK(width >= 16 && height >= 16 && width <= 16384 && height <= 16384,
             "render_loss_png: width and height must be in [16, 16384], got ", width, "x", height);
  const Chart chart = layout(choose_scale(losses), losses.size(), width, height);
  Image img(width, height, kPlotBackground);
  draw_frame(img, chart, losses.size());
  draw_labels(img, chart, losses.size());
  draw_curve(img, chart, losses);
  return encode_png(img);
}

}  // namespace loom::trainer
