// Group norm kernels, forward and backward (params in cuda_fused.h): the forward as chunk statistics
// then the normalisation (below); the backward first sums dy and dy·x̂ per (sample, channel), from
// which both dx (per group) and dweight / dbias (over samples) follow.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "tensor/cuda/cuda_norm_common.cuh"

namespace loom::cuda {
namespace {

// ---- group norm ----------------------------------------------------------------------

// The forward in two kernels over the (sample, group) items, whose cg·S values are contiguous:
//   statistics  grid (chunks, items): block (k, item) takes chunk k of kGroupNormChunk values of
//               the item and writes its mean and M2 = Σ (x − mean)² (two passes over the chunk,
//               which stays in L1) into `partial` [items][chunks][2];
//   apply       grid (blocks per item, items): each block combines the item's chunks (Chan's
//               formula: mean = Σ nᵢ·meanᵢ / n, M2 = Σ M2ᵢ + nᵢ·(meanᵢ − mean)², in the same order
//               in every block), then y = x̂·w + b, or silu of it with kSilu, over its share.
// The group is read twice from memory and written once, by thousands of blocks. (One block per
// item read it three times from memory where it outgrew L1 — 328 KB at SDXL's 320 channels and
// 128×128 — with 256 blocks on the whole GPU.) kVec: over 16-byte packs (the spatial extent a
// multiple of the pack and x, y aligned, so a pack never crosses a channel). kShift: the item's
// values are u = x + shift[n, c] (p.shift), formed in Acc.

// shift[n, c] of the channel that holds element e of item `item`'s cg·S values (0 without kShift).
template <bool kShift, typename T>
__device__ __forceinline__ compute_t<T> item_shift(const GroupNormParams& p, int64_t item, int64_t e) {
  if constexpr (kShift) {
    const int64_t cg = p.channels / p.groups;
    const int64_t c = (item % p.groups) * cg + e / p.spatial;
    return widen(static_cast<const T*>(p.shift)[(item / p.groups) * p.channels + c]);
  } else {
    return compute_t<T>(0);
  }
}

// v + sh with kShift; v itself without (x + 0 is not x for x = −0, so the plain kernels skip it).
template <bool kShift, typename Acc>
__device__ __forceinline__ Acc plus_shift(Acc v, Acc sh) {
  if constexpr (kShift) return v + sh;
  else return v;
}

template <typename T, bool kVec, bool kShift>
__global__ void group_norm_stats_kernel(GroupNormParams p) {
  using Acc = compute_t<T>;
  using P = std::conditional_t<kVec, Pack16<T>, PackN<T, 1>>;
  constexpr int V = P::kSize;
  __shared__ Acc scratch[kThreads / 32];
  const int64_t item = blockIdx.y, chunks = gridDim.x;
  const int64_t count = p.channels / p.groups * p.spatial;
  const int64_t e0 = int64_t(blockIdx.x) * kGroupNormChunk, e1 = min(e0 + kGroupNormChunk, count);
  const T* xt = static_cast<const T*>(p.x);
  const P* x = reinterpret_cast<const P*>(xt + item * count + e0);
  const int64_t packs = (e1 - e0) / V;
  Acc s = Acc(0);
  for (int64_t i = threadIdx.x; i < packs; i += kThreads) {
    const P v = x[i];
    const Acc sh = item_shift<kShift, T>(p, item, e0 + i * V);
#pragma unroll
    for (int k = 0; k < V; ++k) s += plus_shift<kShift>(widen(v.v[k]), sh);
  }
  const Acc n = Acc(e1 - e0);
  const Acc mean = group_reduce<kThreads, RSum<Acc>>(s, scratch) / n;
  Acc m2 = Acc(0);
  for (int64_t i = threadIdx.x; i < packs; i += kThreads) {
    const P v = x[i];
    const Acc sh = item_shift<kShift, T>(p, item, e0 + i * V);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const Acc d = plus_shift<kShift>(widen(v.v[k]), sh) - mean;
      m2 += d * d;
    }
  }
  m2 = group_reduce<kThreads, RSum<Acc>>(m2, scratch);
  if (threadIdx.x == 0) {
    Acc* out = static_cast<Acc*>(p.partial) + (item * chunks + blockIdx.x) * 2;
    out[0] = mean, out[1] = m2;
  }
}

template <typename T, bool kVec, bool kSilu, bool kShift>
__global__ void group_norm_apply_kernel(GroupNormParams p, int64_t chunks) {
  using Acc = compute_t<T>;
  using P = std::conditional_t<kVec, Pack16<T>, PackN<T, 1>>;
  constexpr int V = P::kSize;
  __shared__ Acc scratch[kThreads / 32];
  const int64_t item = blockIdx.y;
  const int64_t cg = p.channels / p.groups, count = cg * p.spatial, c0 = (item % p.groups) * cg;
  // the item's statistics from its chunks (chunk k holds kGroupNormChunk values, the last the rest)
  const Acc* part = static_cast<const Acc*>(p.partial) + item * chunks * 2;
  auto chunk_n = [&](int64_t k) { return Acc(min(kGroupNormChunk, count - k * kGroupNormChunk)); };
  Acc s = Acc(0);
  for (int64_t k = threadIdx.x; k < chunks; k += kThreads) s += chunk_n(k) * part[2 * k];
  const Acc mean = group_reduce<kThreads, RSum<Acc>>(s, scratch) / Acc(count);
  Acc m2 = Acc(0);
  for (int64_t k = threadIdx.x; k < chunks; k += kThreads) {
    const Acc d = part[2 * k] - mean;
    m2 += part[2 * k + 1] + chunk_n(k) * d * d;
  }
  const Acc var = group_reduce<kThreads, RSum<Acc>>(m2, scratch) / Acc(count);
  const Acc rstd = Acc(1) / m_sqrt(var + Acc(p.eps));
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    static_cast<Acc*>(p.mean)[item] = mean;
    static_cast<Acc*>(p.rstd)[item] = rstd;
  }
  if (p.y == nullptr) return;  // the statistics only (one block per item)
  const T* w = static_cast<const T*>(p.weight);
  const T* b = static_cast<const T*>(p.bias);
  const P* x = reinterpret_cast<const P*>(static_cast<const T*>(p.x) + item * count);
  P* y = reinterpret_cast<P*>(static_cast<T*>(p.y) + item * count);
  const int64_t packs = count / V;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < packs; i += int64_t(gridDim.x) * kThreads) {
    const int64_t c = c0 + i * V / p.spatial;
    const Acc wc = rstd * load_or(w, c, Acc(1)), bc = load_or(b, c, Acc(0));
    const Acc sh = item_shift<kShift, T>(p, item, i * V);
    P v = x[i];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      Acc out = (plus_shift<kShift>(widen(v.v[k]), sh) - mean) * wc + bc;
      if constexpr (kSilu) out = out / (Acc(1) + m_exp(-out));
      v.v[k] = narrow<T>(out);
    }
    y[i] = v;
  }
}

// sums[0][nc] = Σ_s dy, sums[1][nc] = Σ_s dy·x̂ for each (sample, channel) row of S,
// one group of kGroup threads per row.
template <typename T, int kGroup>
__global__ void group_norm_sums_kernel(GroupNormGradParams p) {
  using Acc = compute_t<T>;
  __shared__ Acc scratch[kGroup / 32];
  constexpr int kRowsPerBlock = kThreads / kGroup;
  const int lane = threadIdx.x % kGroup;
  const Acc* mean_in = static_cast<const Acc*>(p.mean);
  const Acc* rstd_in = static_cast<const Acc*>(p.rstd);
  Acc* sums = static_cast<Acc*>(p.sums);
  const int64_t rows = p.batch * p.channels, cg = p.channels / p.groups;
  for (int64_t nc = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroup; nc < rows;
       nc += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t item = (nc / p.channels) * p.groups + (nc % p.channels) / cg;
    const Acc mean = mean_in[item], rstd = rstd_in[item];
    const T* x = static_cast<const T*>(p.x) + nc * p.spatial;
    const T* dy = static_cast<const T*>(p.dy) + nc * p.spatial;
    Acc s1 = Acc(0), s2 = Acc(0);
    for (int64_t s = lane; s < p.spatial; s += kGroup) {
      const Acc g = widen(dy[s]);
      s1 += g;
      s2 += g * ((widen(x[s]) - mean) * rstd);
    }
    s1 = group_reduce<kGroup, RSum<Acc>>(s1, scratch);
    s2 = group_reduce<kGroup, RSum<Acc>>(s2, scratch);
    if (lane == 0) {
      sums[nc] = s1;
      sums[rows + nc] = s2;
    }
  }
}

// dx from the per-channel sums: grid (blocks per item, items), as group_norm_apply_kernel — each
// block sums the item's cg channels' terms (few), then takes its share of the item's values, in
// 16-byte packs with kVec (the spatial extent a multiple of the pack and x, dy, dx aligned). (One
// block per item ran 128 blocks at SDXL's batch 4, an element and a 64-bit division at a time.)
// Grid row r is item item0 + r (launches of at most 65535 items).
template <typename T, bool kVec>
__global__ void group_norm_dx_kernel(GroupNormGradParams p, int64_t item0) {
  using Acc = compute_t<T>;
  using P = std::conditional_t<kVec, Pack16<T>, PackN<T, 1>>;
  constexpr int V = P::kSize;
  const T* w = static_cast<const T*>(p.weight);
  const Acc* sums = static_cast<const Acc*>(p.sums);
  const int64_t item = item0 + blockIdx.y;
  const int64_t rows = p.batch * p.channels, cg = p.channels / p.groups, count = cg * p.spatial;
  const int64_t n = item / p.groups, c0 = (item % p.groups) * cg;
  Acc mg = Acc(0), mgx = Acc(0);  // every thread sums the group's cg channels (few)
  for (int64_t c = 0; c < cg; ++c) {
    const Acc wc = load_or(w, c0 + c, Acc(1));
    mg += wc * sums[n * p.channels + c0 + c];
    mgx += wc * sums[rows + n * p.channels + c0 + c];
  }
  mg /= Acc(count);
  mgx /= Acc(count);
  const Acc mean = static_cast<const Acc*>(p.mean)[item], rstd = static_cast<const Acc*>(p.rstd)[item];
  const int64_t base = n * p.channels * p.spatial + c0 * p.spatial;
  const P* x = reinterpret_cast<const P*>(static_cast<const T*>(p.x) + base);
  const P* dy = reinterpret_cast<const P*>(static_cast<const T*>(p.dy) + base);
  P* dx = reinterpret_cast<P*>(static_cast<T*>(p.dx) + base);
  const int64_t packs = count / V;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < packs; i += int64_t(gridDim.x) * kThreads) {
    const Acc wc = load_or(w, c0 + i * V / p.spatial, Acc(1));
    const P xv = x[i], gv = dy[i];
    P out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const Acc xh = (widen(xv.v[k]) - mean) * rstd;
      out.v[k] = narrow<T>(rstd * (widen(gv.v[k]) * wc - mg - xh * mgx));
    }
    dx[i] = out;
  }
}

}  // namespace

int64_t group_norm_chunks(const GroupNormParams& p) {
  const int64_t count = p.channels / p.groups * p.spatial;
  return std::max<int64_t>(1, (count + kGroupNormChunk - 1) / kGroupNormChunk);
}

namespace {
// The two kernels over p's batch · groups items (≤ 65535: grid rows).
void launch_group_norm_slice(const GroupNormParams& p, int64_t chunks) {
  dispatch_float(p.dtype, "cuda group_norm", [&](auto tag) {
    using T = decltype(tag);
    const bool vec = p.spatial % Pack16<T>::kSize == 0 && aligned16(p.x) && aligned16(p.y);
    const int64_t items = p.batch * p.groups;
    const int64_t count = p.channels / p.groups * p.spatial, packs = vec ? count / Pack16<T>::kSize : count;
    const dim3 stats_grid{unsigned(chunks), unsigned(items)};
    const dim3 apply_grid{p.y ? grid_for(packs, int64_t(kThreads) * 4) : 1u, unsigned(items)};
    auto launch = [&](auto vec_tag, auto silu_tag, auto shift_tag) {
      constexpr bool kVec = decltype(vec_tag)::value, kShift = decltype(shift_tag)::value;
      group_norm_stats_kernel<T, kVec, kShift><<<stats_grid, kThreads, 0, compute_stream()>>>(p);
      check_last_launch("group_norm_stats_kernel");
      group_norm_apply_kernel<T, kVec, decltype(silu_tag)::value, kShift>
          <<<apply_grid, kThreads, 0, compute_stream()>>>(p, chunks);
    };
    auto with_shift = [&](auto vec_tag, auto silu_tag) {
      if (p.shift) launch(vec_tag, silu_tag, std::true_type{});
      else launch(vec_tag, silu_tag, std::false_type{});
    };
    using Yes = std::true_type;
    using No = std::false_type;
    if (vec) p.silu ? with_shift(Yes{}, Yes{}) : with_shift(Yes{}, No{});
    else p.silu ? with_shift(No{}, Yes{}) : with_shift(No{}, No{});
    check_last_launch(!p.y ? "group_norm_kernel (statistics)" : p.silu ? "group_norm_kernel (+ silu)" : "group_norm_kernel");
  });
}
}  // namespace

void launch_group_norm(const GroupNormParams& p) {
  if (p.batch == 0 || p.channels == 0) return;
  if (p.spatial == 0) {  // empty groups: nothing to normalise; the statistics as the CPU's (mean 0, rstd 1/√eps)
    const DType stats = p.dtype == DType::F64 ? DType::F64 : DType::F32;
    launch_fill({p.mean, stats, p.batch * p.groups, 0.0});
    launch_fill({p.rstd, stats, p.batch * p.groups, 1.0 / std::sqrt(p.eps)});
    return;
  }
  LOOM_CHECK(p.partial != nullptr, "cuda group_norm: no scratch for the chunk statistics");
  // grid rows are (sample, group) items: at most kMaxRows a launch, so whole samples in slices
  constexpr int64_t kMaxRows = 65535;
  LOOM_CHECK(p.groups <= kMaxRows, "cuda group_norm: ", p.groups, " groups exceed ", kMaxRows);
  const int64_t chunks = group_norm_chunks(p), per_launch = kMaxRows / p.groups;
  const size_t elem = itemsize(p.dtype), stat = p.dtype == DType::F64 ? sizeof(double) : sizeof(float);
  for (int64_t n0 = 0; n0 < p.batch; n0 += per_launch) {
    GroupNormParams q = p;
    q.batch = std::min(per_launch, p.batch - n0);
    const int64_t items0 = n0 * p.groups, values0 = n0 * p.channels * p.spatial;
    q.x = static_cast<const char*>(p.x) + values0 * elem;
    if (p.y) q.y = static_cast<char*>(p.y) + values0 * elem;
    if (p.shift) q.shift = static_cast<const char*>(p.shift) + n0 * p.channels * elem;
    q.mean = static_cast<char*>(p.mean) + items0 * stat;
    q.rstd = static_cast<char*>(p.rstd) + items0 * stat;
    q.partial = static_cast<char*>(p.partial) + items0 * chunks * 2 * stat;
    launch_group_norm_slice(q, chunks);
  }
}

void launch_group_norm_backward(const GroupNormGradParams& p) {
  if (p.batch == 0 || p.channels == 0) return;
  dispatch_float(p.dtype, "cuda group_norm_backward", [&](auto tag) {
    using T = decltype(tag);
    using Acc = compute_t<T>;
    const int64_t rows = p.batch * p.channels;
    launch_rows(
        rows, p.spatial, [&](unsigned grid) { group_norm_sums_kernel<T, 32><<<grid, kThreads, 0, compute_stream()>>>(p); },
        [&](unsigned grid) { group_norm_sums_kernel<T, kThreads><<<grid, kThreads, 0, compute_stream()>>>(p); }, "group_norm_sums_kernel");
    if (p.dx) {
      const bool vec = p.spatial % Pack16<T>::kSize == 0 && aligned16(p.x) && aligned16(p.dy) && aligned16(p.dx);
      const int64_t count = p.channels / p.groups * p.spatial, packs = vec ? count / Pack16<T>::kSize : count;
      const int64_t items = p.batch * p.groups;
      for (int64_t item0 = 0; item0 < items; item0 += 65535) {  // grid rows: at most 65535 items a launch
        const dim3 grid{grid_for(packs, int64_t(kThreads) * 4), unsigned(std::min<int64_t>(65535, items - item0))};
        if (vec) group_norm_dx_kernel<T, true><<<grid, kThreads, 0, compute_stream()>>>(p, item0);
        else group_norm_dx_kernel<T, false><<<grid, kThreads, 0, compute_stream()>>>(p, item0);
      }
      check_last_launch("group_norm_dx_kernel");
    }
    if (p.dweight || p.dbias) {
      // sums viewed as [2][N][C]: the per-channel sums over samples are the "chunks" of
      // param_grad_finish_kernel with the roles of dweight (Σ dy·x̂) and dbias (Σ dy) swapped.
      param_grad_finish_kernel<T><<<grid_for(p.channels), kThreads, 0, compute_stream()>>>(
          static_cast<const Acc*>(p.sums), p.batch, p.channels, static_cast<T*>(p.dbias), static_cast<T*>(p.dweight));
      check_last_launch("param_grad_finish_kernel");
    }
  });
}

}  // namespace loom::cuda
