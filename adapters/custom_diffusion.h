// Custom Diffusion (SPEC §4): per attention layer, trainable copies of the key
// and value projections (train_kv) and of the query and output projections
// (train_q_out), held by the layer's processor so that their keys read
// `…attn2.processor.to_k_custom_diffusion.weight`. In cross-attention the
// gradient of K and V at key position 0 is blocked; the forward is unchanged.
#pragma once

#include <string>
#include <vector>

#include "attention/attention.h"

namespace loom::adapters {

struct CustomDiffusionOptions {
  bool train_kv = true;
  bool train_q_out = true;
  bool out_bias = true;
  double dropout = 0.0;
};

class CustomDiffusionProcessor : public attention::AttentionProcessor {
 public:
  // Creates the trainable projections of `attn` as copies of its base weights. The base
  // to_q / to_k / to_v must have no bias (the custom copies have none, as in diffusers).
  CustomDiffusionProcessor(const attention::Attention& attn, const CustomDiffusionOptions& options);
  std::string type_name() const override { return "CustomDiffusionAttnProcessor"; }
  Variable process(const attention::Attention& attn, const Variable& x, const Variable& context,
                   const Tensor& mask) const override;
  const CustomDiffusionOptions& options() const { return options_; }

 private:
  CustomDiffusionOptions options_;
};

// Leaves the forward unchanged and zeroes the gradient at sequence position 0 of x [B, K, C].
Variable block_first_position_gradient(const Variable& x);

// Applies a diffusers recipe to every cross-attention layer (attn2) of `model`:
// "crossattn_kv" (train_kv), or "crossattn" (train_kv and train_q_out). Self-attention
// layers (attn1) are untouched. Freezes the model, then returns the trainable
// parameters with their dotted names in the model.
std::vector<std::pair<std::string, Variable>> apply_custom_diffusion(nn::Module& model,
                                                                    const std::string& recipe = "crossattn_kv",
                                                                    bool out_bias = true, double dropout = 0.0);

}  // namespace loom::adapters
