#include "adapters/lycoris.h"

#include <algorithm>
#include <sstream>

#include "autograd/ops.h"

namespace loom::adapters {

const std::vector<std::string>& loha_factor_names() {
  static const std::vector<std::string> names = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"};
  return names;
}

const std::vector<std::string>& lokr_factor_names() {
  static const std::vector<std::string> names = {"lokr_w1", "lokr_w1_a", "lokr_w1_b",
                                                 "lokr_w2", "lokr_w2_a", "lokr_w2_b"};
  return names;
}

namespace {

struct WeightDims {
  int64_t out = 0, in = 0, kernel = 1;  // kernel = kh·kw (1 for a Linear)
  int64_t cols() const { return in * kernel; }
};

WeightDims dims_of(const Shape& s) {
  WeightDims d{s.at(0), s.at(1), 1};
  for (size_t i = 2; i < s.size(); ++i) d.kernel *= s[i];
  return d;
}

bool has(const LoraModule& m, const std::string& name) { return m.factors.count(name) > 0; }

const Variable& factor(const LoraModule& m, const std::string& name) { return m.factors.at(name); }

// A factor as a matrix of `rows` rows in `dtype`: [rows, numel / rows].
Variable rows_of(const LoraModule& m, const std::string& name, DType dtype) {
  const Variable& v = factor(m, name);
  return reshape(to_dtype(v, dtype), {v.size(0), -1});
}

// kron(a, b) of two matrices: a (a1, a2), b (b1, c) -> (a1·b1, a2·c), element
// [i·b1 + j, k·c + l] = a[i, k]·b[j, l]: [a1, 1, a2, 1] ∘ [1, b1, 1, c] -> [a1, b1, a2, c].
Variable kron(const Variable& a, const Variable& b) {
  const int64_t a1 = a.size(0), a2 = a.size(1), b1 = b.size(0), c = b.size(1);
  return reshape(reshape(a, {a1, 1, a2, 1}) * reshape(b, {1, b1, 1, c}), {a1 * b1, a2 * c});
}

std::string shape_text(const Shape& s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

[[noreturn]] void shape_error(const std::string& adapter, const std::string& path, const LoraModule& m,
                              const std::string& key, const Shape& got, const std::string& need) {
  LOOM_FAIL(module_kind_name(m.kind), " '", adapter, "': '", path, ".", key, "' has shape ", shape_text(got),
            ", the module needs ", need, " (wrong base model?)");
}

void require(const std::string& adapter, const std::string& path, const LoraModule& m, const std::string& key) {
  LOOM_CHECK(has(m, key), module_kind_name(m.kind), " '", adapter, "': '", path, "' lacks '", key, "'");
}

// A factor that must be a matrix (rows, cols), or (rows, cols, 1, 1).
void check_matrix(const std::string& adapter, const std::string& path, const LoraModule& m, const std::string& key,
                  int64_t rows, int64_t cols, const std::string& need) {
  const Shape s = factor(m, key).shape();
  const bool ok = (s.size() == 2 || (s.size() == 4 && s[2] == 1 && s[3] == 1)) && (rows < 0 || s[0] == rows) &&
                  (cols < 0 || s[1] == cols);
  if (!ok) shape_error(adapter, path, m, key, s, need);
}

// A "b" factor: (r, cols) or, for a conv, (r, in, kh, kw) with in·kh·kw = cols.
void check_b(const std::string& adapter, const std::string& path, const LoraModule& m, const std::string& key,
             int64_t r, int64_t cols, const std::string& need) {
  const Shape s = factor(m, key).shape();
  const int64_t numel = factor(m, key).numel();
  if (s.size() < 2 || s[0] != r || numel != r * cols) shape_error(adapter, path, m, key, s, need);
}

void check_loha(const std::string& adapter, const std::string& path, LoraModule& m, const WeightDims& d) {
  for (const auto& name : loha_factor_names()) require(adapter, path, m, name);
  for (const char* pair : {"1", "2"}) {
    const std::string a = std::string("hada_w") + pair + "_a", b = std::string("hada_w") + pair + "_b";
    check_matrix(adapter, path, m, a, d.out, -1, "(" + std::to_string(d.out) + ", r)");
    const int64_t r = factor(m, a).size(1);
    check_b(adapter, path, m, b, r, d.cols(),
            "(" + std::to_string(r) + ", " + std::to_string(d.cols()) + ") (rank of " + a + ", in·kh·kw)");
  }
  m.rank = factor(m, "hada_w1_b").size(0);
}

void check_lokr(const std::string& adapter, const std::string& path, LoraModule& m, const WeightDims& d) {
  const bool w1_full = has(m, "lokr_w1"), w2_full = has(m, "lokr_w2");
  if (!w1_full) require(adapter, path, m, "lokr_w1_a"), require(adapter, path, m, "lokr_w1_b");
  if (!w2_full) require(adapter, path, m, "lokr_w2_a"), require(adapter, path, m, "lokr_w2_b");
  int64_t a1 = 0, a2 = 0;
  if (w1_full) {
    check_matrix(adapter, path, m, "lokr_w1", -1, -1, "a matrix (a1, a2)");
    a1 = factor(m, "lokr_w1").size(0), a2 = factor(m, "lokr_w1").size(1);
  } else {
    check_matrix(adapter, path, m, "lokr_w1_a", -1, -1, "a matrix (a1, r)");
    const int64_t r = factor(m, "lokr_w1_a").size(1);
    check_matrix(adapter, path, m, "lokr_w1_b", r, -1, "(" + std::to_string(r) + ", a2) (rank of lokr_w1_a)");
    a1 = factor(m, "lokr_w1_a").size(0), a2 = factor(m, "lokr_w1_b").size(1);
  }
  const std::string w1_key = w1_full ? "lokr_w1" : "lokr_w1_a";
  if (a1 <= 0 || a2 <= 0 || d.out % a1 != 0 || d.in % a2 != 0)
    shape_error(adapter, path, m, w1_key, factor(m, w1_key).shape(),
                "(a1, a2) dividing (out, in) = (" + std::to_string(d.out) + ", " + std::to_string(d.in) + ")");
  const int64_t b1 = d.out / a1, b2 = d.in / a2;
  const std::string w2_need = "(" + std::to_string(b1) + ", " + std::to_string(b2) +
                              (d.kernel > 1 ? ", kh, kw" : "") + ") (out/a1, in/a2 with w1 " +
                              std::to_string(a1) + "×" + std::to_string(a2) + ")";
  if (w2_full) {
    const Variable& w2 = factor(m, "lokr_w2");
    const Shape s = w2.shape();
    const bool ok = s.size() >= 2 && s[0] == b1 && s[1] == b2 && w2.numel() == b1 * b2 * d.kernel;
    if (!ok) shape_error(adapter, path, m, "lokr_w2", s, w2_need);
  } else {
    check_matrix(adapter, path, m, "lokr_w2_a", b1, -1, "(" + std::to_string(b1) + ", r) (out/a1)");
    const int64_t r = factor(m, "lokr_w2_a").size(1);
    check_b(adapter, path, m, "lokr_w2_b", r, b2 * d.kernel,
            "(" + std::to_string(r) + ", " + std::to_string(b2 * d.kernel) + ") (rank of lokr_w2_a, in/a2·kh·kw)");
  }
  m.rank = lycoris_rank(m);
}

}  // namespace

int64_t lycoris_rank(const LoraModule& m) {
  if (m.kind == ModuleKind::LoHa) return has(m, "hada_w1_b") ? factor(m, "hada_w1_b").size(0) : 0;
  if (m.kind == ModuleKind::LoKr) {
    if (has(m, "lokr_w1_a")) return factor(m, "lokr_w1_a").size(1);
    if (has(m, "lokr_w2_a")) return factor(m, "lokr_w2_a").size(1);
    return 0;
  }
  return m.down.defined() ? m.down.size(0) : 0;
}

void check_module_shapes(const std::string& adapter, const std::string& path, LoraModule& m,
                         const Shape& weight_shape) {
  const WeightDims d = dims_of(weight_shape);
  const std::vector<std::string>& allowed =
      m.kind == ModuleKind::LoHa ? loha_factor_names() : lokr_factor_names();
  if (m.kind != ModuleKind::LoRA) {
    for (const auto& [name, v] : m.factors) {
      LOOM_CHECK(std::find(allowed.begin(), allowed.end(), name) != allowed.end(), module_kind_name(m.kind), " '",
                 adapter, "': '", path, ".", name, "' is not a ", module_kind_name(m.kind), " factor");
      LOOM_CHECK(v.defined(), module_kind_name(m.kind), " '", adapter, "': '", path, ".", name, "' is empty");
    }
    if (m.kind == ModuleKind::LoHa) check_loha(adapter, path, m, d);
    if (m.kind == ModuleKind::LoKr) check_lokr(adapter, path, m, d);
  }
  if (m.magnitude.defined()) {
    const int64_t want = m.dora_norm == DoraNorm::PerOutput ? d.out : d.in;
    LOOM_CHECK(m.magnitude.numel() == want, "DoRA '", adapter, "': '", path, ".", m.magnitude_name, "' has shape ",
               shape_text(m.magnitude.shape()), ", the module needs ", want, " values (one per ",
               m.dora_norm == DoraNorm::PerOutput ? "output" : "input", " channel of a weight ",
               shape_text(weight_shape), ")");
  }
}

Variable raw_delta(const LoraModule& m, const Shape& weight_shape, DType dtype, const std::string& path) {
  const WeightDims d = dims_of(weight_shape);
  Variable delta;
  switch (m.kind) {
    case ModuleKind::LoRA:
      // [out, r] x [r, K]
      delta = matmul(reshape(to_dtype(m.up, dtype), {m.up.size(0), -1}), reshape(to_dtype(m.down, dtype), {m.down.size(0), -1}));
      break;
    case ModuleKind::LoHa:
      // ([out, r1] x [r1, K]) ∘ ([out, r2] x [r2, K])
      delta = matmul(rows_of(m, "hada_w1_a", dtype), rows_of(m, "hada_w1_b", dtype)) *
              matmul(rows_of(m, "hada_w2_a", dtype), rows_of(m, "hada_w2_b", dtype));
      break;
    case ModuleKind::LoKr: {
      const Variable w1 = has(m, "lokr_w1") ? rows_of(m, "lokr_w1", dtype)
                                            : matmul(rows_of(m, "lokr_w1_a", dtype), rows_of(m, "lokr_w1_b", dtype));
      // [b1, b2·kh·kw]: a conv's w2 (b1, b2, kh, kw) flattened, or w2_a [b1, r] x w2_b [r, b2·kh·kw]
      const Variable w2 = has(m, "lokr_w2") ? rows_of(m, "lokr_w2", dtype)
                                            : matmul(rows_of(m, "lokr_w2_a", dtype), rows_of(m, "lokr_w2_b", dtype));
      delta = kron(w1, w2);  // [a1·b1, a2·b2·kh·kw]: the conv's (out, in, kh, kw) flattened
      break;
    }
  }
  LOOM_CHECK(delta.size(0) == d.out && delta.size(1) == d.cols(), module_kind_name(m.kind), " at '", path,
             "': ΔW has shape ", shape_text(delta.shape()), ", the weight ", shape_text(weight_shape));
  return delta;
}

Variable module_delta(const LoraModule& m, const Shape& weight_shape, const Tensor& base, DType dtype,
                      const std::string& path) {
  const Variable scaled = raw_delta(m, weight_shape, dtype, path) * m.scale();  // s·ΔW [out, K]
  if (!m.magnitude.defined()) return scaled;
  const WeightDims d = dims_of(weight_shape);
  const Variable w(base.to(dtype).reshape({d.out, d.cols()}));  // the frozen base, no gradient
  // V = W + s·ΔW viewed [out, in, kh·kw]; the norm per output row (over in and the kernel) or
  // per input channel (over the rows and the kernel), a constant for autograd.
  const bool per_output = m.dora_norm == DoraNorm::PerOutput;
  const Shape per = per_output ? Shape{d.out, 1, 1} : Shape{1, d.in, 1};
  Tensor norm;
  {
    NoGradGuard no_grad;
    const Variable v = reshape(w + scaled.detach(), {d.out, d.in, d.kernel});
    norm = (sqrt(sum(v * v, per_output ? std::vector<int64_t>{1, 2} : std::vector<int64_t>{0, 2}, true)) +
            m.dora_eps)
               .tensor();
  }
  const Variable scale = reshape(to_dtype(m.magnitude, dtype), per) / Variable(norm);  // m / ‖V‖
  // W' − W = (m/‖V‖ − 1)∘W + m/‖V‖∘s·ΔW
  const Variable change = (scale - 1.0) * reshape(w, {d.out, d.in, d.kernel}) +
                          scale * reshape(scaled, {d.out, d.in, d.kernel});
  return reshape(change, {d.out, d.cols()});
}

}  // namespace loom::adapters
