// Feed-forward blocks of diffusers' attention.py, with its parameter names.
//
//   GELU(in, out):   y = gelu(proj(x)),            proj: Linear in -> out
//   GEGLU(in, out):  [h, g] = proj(x) split in half along the last dim (h first),
//                    y = h · gelu(g) (exact erf gelu), proj: Linear in -> 2·out
//   FeedForward:     net.0 = activation (GEGLU / GELU, its Linear is net.0.proj),
//                    net.1 = Dropout, net.2 = Linear inner -> dim_out,
//                    [net.3 = Dropout when final_dropout]
// All take x [..., in] and return [..., out].
#pragma once

#include <string>

#include "nn/linear.h"
#include "nn/norm.h"

namespace loom::nn {

class GELU : public UnaryModule {
 public:
  // approximate: the tanh form (diffusers' "gelu-approximate"); else the exact erf form.
  GELU(int64_t dim_in, int64_t dim_out, bool approximate = false, bool bias = true,
       Generator& gen = default_generator(), DType dtype = DType::F32, Device device = Device::cpu());
  std::string type_name() const override { return "GELU"; }
  Variable forward(const Variable& x) const override;  // [..., in] -> [..., out]
  std::shared_ptr<Linear> proj() const { return child_as<Linear>("proj"); }
  bool approximate() const { return approximate_; }

 private:
  bool approximate_;
};

class GEGLU : public UnaryModule {
 public:
  GEGLU(int64_t dim_in, int64_t dim_out, bool bias = true, Generator& gen = default_generator(),
        DType dtype = DType::F32, Device device = Device::cpu());
  std::string type_name() const override { return "GEGLU"; }
  Variable forward(const Variable& x) const override;  // [..., in] -> [..., out]
  std::shared_ptr<Linear> proj() const { return child_as<Linear>("proj"); }
};

struct FeedForwardOptions {
  int64_t dim = 0;                  // input features (required)
  int64_t dim_out = 0;              // output features; 0 = dim
  int64_t mult = 4;                 // inner = dim · mult ...
  int64_t inner_dim = 0;            // ... unless this is > 0
  std::string activation = "geglu";  // "geglu" | "gelu" | "gelu-approximate"
  double dropout = 0.0;             // net.1
  bool final_dropout = false;       // adds net.3 = Dropout(dropout)
  bool bias = true;                 // of both Linears
};

class FeedForward : public UnaryModule {
 public:
  explicit FeedForward(const FeedForwardOptions& options, Generator& gen = default_generator(),
                       DType dtype = DType::F32, Device device = Device::cpu());
  // Shorthand: dim_out 0 means dim. Unknown activation -> loom::Error naming it.
  explicit FeedForward(int64_t dim, int64_t dim_out = 0, int64_t mult = 4, const std::string& activation = "geglu",
                       double dropout = 0.0, Generator& gen = default_generator(), DType dtype = DType::F32,
                       Device device = Device::cpu());
  std::string type_name() const override { return "FeedForward"; }
  Variable forward(const Variable& x) const override;  // [..., dim] -> [..., dim_out]

  const FeedForwardOptions& options() const { return options_; }  // dim_out and inner_dim resolved
  std::shared_ptr<Sequential> net() const { return child_as<Sequential>("net"); }

 private:
  FeedForwardOptions options_;
};

// Builds the activation module named by diffusers' activation_fn; throws
// loom::Error naming an unknown one.
std::shared_ptr<UnaryModule> make_activation(const std::string& name, int64_t dim_in, int64_t dim_out, bool bias,
                                             Generator& gen, DType dtype, Device device);

}  // namespace loom::nn
