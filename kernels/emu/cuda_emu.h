// cuda_emu.h — just enough of CUDA to run kernels/kd/kd_fused.cu on the CPU.
//
// Every CUDA thread of a block is a std::thread; __syncthreads is a block
// barrier and __shfl_xor_sync a per-warp exchange between two warp barriers,
// so the kernels' real parallel decomposition (sweeps, shuffles, shared
// memory, barriers, grid-stride rows) runs as written. Blocks run one after
// another (their __shared__ arrays are function statics). For tests only:
// it checks indexing and reductions without a GPU, not speed or races.
#pragma once

// Lets kernels/common/block.cuh and the kd/feature block helpers compile here.
#define KD_EMU 1

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct KdEmuDim {
  unsigned x = 0, y = 0, z = 0;
};
// inline: one emulator state for every translation unit that includes this.
inline thread_local KdEmuDim threadIdx, blockIdx, blockDim, gridDim;

struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

inline unsigned atomicOr(unsigned* p, unsigned v) {
  return std::atomic_ref<unsigned>(*p).fetch_or(v);
}

inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return std::atomic_ref<unsigned>(*p).fetch_add(v);
}

inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> a(*p);
  unsigned long long old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}

struct KdEmuBlock {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> exchange;  // one slot per thread
};
inline KdEmuBlock* kd_emu_block = nullptr;

// One emulated launch sequence at a time (held by the entry points): blocks
// share the kernels' function-static __shared__ arrays and kd_emu_block.
inline std::mutex kd_emu_mutex;

inline void __syncthreads() { kd_emu_block->block->arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int off) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  kd_emu_block->exchange[threadIdx.x] = bits;
  kd_emu_block->warps[warp]->arrive_and_wait();
  const uint64_t got = kd_emu_block->exchange[(warp << 5) | (lane ^ (unsigned)off)];
  kd_emu_block->warps[warp]->arrive_and_wait();
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

// Runs f() as a grid of `grid` blocks of `block` threads (block a multiple of 32).
template <typename F>
void kd_emu_launch(unsigned grid, unsigned block, F f) {
  for (unsigned b = 0; b < grid; ++b) {
    KdEmuBlock blk;
    blk.block = std::make_unique<std::barrier<>>(block);
    for (unsigned w = 0; w < block / 32; ++w) blk.warps.push_back(std::make_unique<std::barrier<>>(32));
    blk.exchange.assign(block, 0);
    kd_emu_block = &blk;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t)
      threads.emplace_back([=, &f] {
        threadIdx.x = t;
        blockIdx.x = b;
        blockDim.x = block;
        gridDim.x = grid;
        f();
      });
    for (auto& th : threads) th.join();
    kd_emu_block = nullptr;
  }
}
