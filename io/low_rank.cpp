// Truncated SVDs in f64 with Eigen (for loom extract / resize; see io/lora_extract.h).
#include <Eigen/Dense>
#include <Eigen/SVD>
#include <algorithm>
#include <numeric>

#include "io/lora_extract.h"

namespace loom::io {

namespace {

using Matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

Matrix to_matrix(const Tensor& t) {
  LOOM_CHECK(t.dim() == 2, "low-rank: expected a matrix, got shape ", t.shape());
  const Tensor h = t.to(Device::cpu()).to(DType::F64).contiguous();
  return Eigen::Map<const Matrix>(h.data<double>(), h.size(0), h.size(1));
}

Tensor to_tensor(const Matrix& m) {
  Tensor t = Tensor::empty({m.rows(), m.cols()}, DType::F64);
  Eigen::Map<Matrix>(t.data<double>(), m.rows(), m.cols()) = m;
  return t;
}

// left = U_r·diag(σ_r), right = V_rᵀ from the SVD of an (m, n) matrix given as U, σ, V.
TruncatedSvd truncate(const Matrix& u, const Eigen::VectorXd& s, const Matrix& v, int64_t rank) {
  TruncatedSvd out;
  out.sigma.assign(s.data(), s.data() + s.size());
  const int64_t r = std::max<int64_t>(0, std::min<int64_t>(rank, s.size()));
  out.left = to_tensor(u.leftCols(r) * s.head(r).asDiagonal());
  out.right = to_tensor(v.leftCols(r).transpose());
  return out;
}

}  // namespace

double energy_share(const std::vector<double>& sigma, int64_t r) {
  double kept = 0, all = 0;
  for (size_t i = 0; i < sigma.size(); ++i) {
    all += sigma[i] * sigma[i];
    if (int64_t(i) < r) kept += sigma[i] * sigma[i];
  }
  return all > 0 ? kept / all : 1.0;
}

double TruncatedSvd::energy_kept() const { return energy_share(sigma, rank()); }

int64_t rank_for_energy(const std::vector<double>& sigma, double share) {
  LOOM_CHECK(share > 0 && share <= 1, "rank_for_energy: the share must be in (0, 1], got ", share);
  double all = 0;
  for (double s : sigma) all += s * s;
  double kept = 0;
  for (size_t i = 0; i < sigma.size(); ++i) {
    kept += sigma[i] * sigma[i];
    // a relative slack of 1e-12 so that share 1 is met despite rounding in the sums
    if (kept >= share * all * (1 - 1e-12)) return int64_t(i) + 1;
  }
  return std::max<int64_t>(1, int64_t(sigma.size()));
}

TruncatedSvd truncated_svd(const Tensor& matrix, int64_t rank) {
  const Matrix m = to_matrix(matrix);
  Eigen::BDCSVD<Eigen::MatrixXd> svd(m, Eigen::ComputeThinU | Eigen::ComputeThinV);
  return truncate(svd.matrixU(), svd.singularValues(), svd.matrixV(), rank);
}

TruncatedSvd truncated_svd_of_product(const Tensor& up, const Tensor& down, int64_t rank) {
  const Matrix b = to_matrix(up), a = to_matrix(down);
  LOOM_CHECK(b.cols() == a.rows(), "low-rank: up ", up.shape(), " and down ", down.shape(), " do not chain");
  const int64_t k = b.cols();
  // up = Qb·Rb, downᵀ = Qa·Ra (thin), so up·down = Qb·(Rb·Raᵀ)·Qaᵀ and the SVD of the k×k core
  // C = Uc·Σ·Vcᵀ gives up·down = (Qb·Uc)·Σ·(Qa·Vc)ᵀ. When k exceeds a side, the thin factors
  // have fewer columns (a rank above min(m, n) has no more singular values).
  Eigen::HouseholderQR<Eigen::MatrixXd> qr_b(b), qr_a(a.transpose());
  const int64_t kb = std::min<int64_t>(k, b.rows()), ka = std::min<int64_t>(k, a.cols());
  const Eigen::MatrixXd qb = qr_b.householderQ() * Eigen::MatrixXd::Identity(b.rows(), kb);
  const Eigen::MatrixXd qa = qr_a.householderQ() * Eigen::MatrixXd::Identity(a.cols(), ka);
  const Eigen::MatrixXd rb = qr_b.matrixQR().topRows(kb).triangularView<Eigen::Upper>();
  const Eigen::MatrixXd ra = qr_a.matrixQR().topRows(ka).triangularView<Eigen::Upper>();
  const Eigen::MatrixXd core = rb * ra.transpose();  // (kb, ka)
  Eigen::JacobiSVD<Eigen::MatrixXd> svd(core, Eigen::ComputeThinU | Eigen::ComputeThinV);
  return truncate(qb * svd.matrixU(), svd.singularValues(), qa * svd.matrixV(), rank);
}

}  // namespace loom::io
