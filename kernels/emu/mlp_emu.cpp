// mlp_emu.cpp — kernels/app/mlp.cu compiled for the CPU under cuda_emu.h, so that
// `cargo test` runs the MLP kernels' own code (grid-stride loops, the dropout
// hash, the optimizer arithmetic) on machines without a GPU. Test-only entry
// points, one per kernel: <kernel>_emu(&args, grid, block), the args its
// launch contract (app/app_args.h).
#include <math.h>

#include "cuda_emu.h"

#include "app/mlp.cu"

#define MLP_EMU(NAME, ARGS)                                                     \
  extern "C" void NAME##_emu(const ARGS* a, unsigned grid, unsigned block) { \
    std::lock_guard<std::mutex> lock(kd_emu_mutex);                           \
    kd_emu_launch(grid, block, [&] { NAME(*a); });                            \
  }
MLP_EMU(mlp_bias_act, MlpBiasActArgs)
MLP_EMU(mlp_relu_back, MlpReluBackArgs)
MLP_EMU(mlp_bias_grad, MlpBiasGradArgs)
MLP_EMU(mlp_sgd, MlpSgdArgs)
MLP_EMU(mlp_adam, MlpAdamArgs)
