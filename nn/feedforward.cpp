#include "nn/feedforward.h"

#include <typeinfo>

#include "autograd/ops.h"

namespace loom::nn {

GELU::GELU(int64_t dim_in, int64_t dim_out, bool approximate, bool bias, Generator& gen, DType dtype,
           Device device)
    : approximate_(approximate) {
  register_module("proj", std::make_shared<Linear>(dim_in, dim_out, bias, gen, dtype, device));
}

Variable GELU::forward(const Variable& x) const { return gelu(proj()->forward(x), approximate_); }

GEGLU::GEGLU(int64_t dim_in, int64_t dim_out, bool bias, Generator& gen, DType dtype, Device device) {
  register_module("proj", std::make_shared<Linear>(dim_in, 2 * dim_out, bias, gen, dtype, device));
}

// The fused op (autograd geglu): [..., 2·out] -> [..., out]; geglu_composed is its reference. A
// plain projection (no adapter on it) goes through linear_geglu: one product where no gradient is
// recorded.
Variable GEGLU::forward(const Variable& x) const {
  const Linear& p = *proj();
  if (p.extension() || typeid(p) != typeid(Linear)) return geglu(p.forward(x));
  return linear_geglu(x, p.weight_matrix_as(x.dtype()), p.bias_as(x.dtype()));
}

std::shared_ptr<UnaryModule> make_activation(const std::string& name, int64_t dim_in, int64_t dim_out, bool bias,
                                             Generator& gen, DType dtype, Device device) {
  if (name == "geglu") return std::make_shared<GEGLU>(dim_in, dim_out, bias, gen, dtype, device);
  if (name == "gelu") return std::make_shared<GELU>(dim_in, dim_out, false, bias, gen, dtype, device);
  if (name == "gelu-approximate") return std::make_shared<GELU>(dim_in, dim_out, true, bias, gen, dtype, device);
  LOOM_FAIL("FeedForward: unknown activation '", name, "' (supported: geglu, gelu, gelu-approximate)");
}

namespace {
FeedForwardOptions resolved(FeedForwardOptions o) {
  LOOM_CHECK(o.dim > 0, "FeedForward: dim must be positive, got ", o.dim);
  if (o.dim_out <= 0) o.dim_out = o.dim;
  if (o.inner_dim <= 0) o.inner_dim = o.dim * o.mult;
  LOOM_CHECK(o.inner_dim > 0, "FeedForward: inner dim must be positive (mult ", o.mult, ")");
  return o;
}

FeedForwardOptions shorthand(int64_t dim, int64_t dim_out, int64_t mult, const std::string& activation,
                             double dropout) {
  FeedForwardOptions o;
  o.dim = dim;
  o.dim_out = dim_out;
  o.mult = mult;
  o.activation = activation;
  o.dropout = dropout;
  return o;
}
}  // namespace

FeedForward::FeedForward(const FeedForwardOptions& options, Generator& gen, DType dtype, Device device)
    : options_(resolved(options)) {
  const FeedForwardOptions& o = options_;
  auto net = register_module("net", std::make_shared<Sequential>());
  net->push_back(make_activation(o.activation, o.dim, o.inner_dim, o.bias, gen, dtype, device));  // net.0
  net->push_back(std::make_shared<Dropout>(o.dropout));                                           // net.1
  net->push_back(std::make_shared<Linear>(o.inner_dim, o.dim_out, o.bias, gen, dtype, device));   // net.2
  if (o.final_dropout) net->push_back(std::make_shared<Dropout>(o.dropout));                      // net.3
}

FeedForward::FeedForward(int64_t dim, int64_t dim_out, int64_t mult, const std::string& activation, double dropout,
                         Generator& gen, DType dtype, Device device)
    : FeedForward(shorthand(dim, dim_out, mult, activation, dropout), gen, dtype, device) {}

Variable FeedForward::forward(const Variable& x) const { return net()->forward(x); }

}  // namespace loom::nn
