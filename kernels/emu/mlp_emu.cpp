// mlp_emu.cpp — kernels/app/mlp.cu compiled for the CPU under cuda_emu.h, so that
// `cargo test` runs the MLP kernels' own code (grid-stride loops, the dropout
// hash, the optimizer arithmetic) on machines without a GPU. Test-only entry
// points, one per kernel: mlp_emu_<kernel>(args…, grid, block).
#include <math.h>

#include "cuda_emu.h"

#include "app/mlp.cu"

extern "C" void mlp_emu_bias_act(float* z, const float* b, long long rows, int cols, int relu,
                                 int dropout, unsigned key, unsigned threshold, float scale,
                                 unsigned grid, unsigned block) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  kd_emu_launch(grid, block, [&] { mlp_bias_act(z, b, rows, cols, relu, dropout, key, threshold, scale); });
}

extern "C" void mlp_emu_relu_back(const float* dh, const float* h, float scale, float* dz, long long n,
                                  unsigned grid, unsigned block) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  kd_emu_launch(grid, block, [&] { mlp_relu_back(dh, h, scale, dz, n); });
}

extern "C" void mlp_emu_bias_grad(const float* dz, long long rows, int cols, float* db, unsigned grid,
                                  unsigned block) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  kd_emu_launch(grid, block, [&] { mlp_bias_grad(dz, rows, cols, db); });
}

extern "C" void mlp_emu_sgd(float* p, const float* g, float* v, long long n, float lr, float mu, float wd,
                            unsigned grid, unsigned block) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  kd_emu_launch(grid, block, [&] { mlp_sgd(p, g, v, n, lr, mu, wd); });
}

extern "C" void mlp_emu_adam(float* p, const float* g, float* m, float* v, long long n, float lr,
                             float beta1, float beta2, float eps, float wd, float c1, float c2,
                             unsigned grid, unsigned block) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  kd_emu_launch(grid, block, [&] { mlp_adam(p, g, m, v, n, lr, beta1, beta2, eps, wd, c1, c2); });
}
