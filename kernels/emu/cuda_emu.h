// cuda_emu.h — just enough of CUDA to run kernels/kd/kd_fused.cu on the CPU.
//
// Every CUDA thread of a block is a std::thread; __syncthreads is a block
// barrier and __shfl_xor_sync a per-warp exchange between two warp barriers,
// so the kernels' real parallel decomposition (sweeps, shuffles, shared
// memory, barriers, grid-stride rows) runs as written. Blocks run one after
// another (their __shared__ arrays are function statics). For tests only:
// it checks indexing and reductions without a GPU, not speed.
//
// Also (kd_emu_launch_cluster, for kernels/kd/kd_single.cu): thread-block
// clusters. The CTAs of one cluster run at once, each with its own dynamic
// shared memory (poisoned: all bits set); kd_cluster_sync is a barrier over
// all their threads; kd_dsmem_load / kd_dsmem_store reach another CTA's
// shared memory and are checked: two accesses to the same bytes from
// different CTAs, one a store, between the same two cluster barriers are a
// race, as is a read of a CTA's memory after that CTA has left. A race is
// reported by the launch (the run's status), whatever order the threads
// happened to take. And byte counts (kd_emu_count, common/global.cuh): the
// bytes the kernels' row loads and stores move, per tracked buffer.
#pragma once

// Lets kernels/common/block.cuh and the kd/feature block helpers compile here.
#define KD_EMU 1

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
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
// The calling thread's block (set by the launches for each thread).
inline thread_local KdEmuBlock* kd_emu_block = nullptr;

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
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t)
      threads.emplace_back([=, &f, &blk] {
        threadIdx.x = t;
        blockIdx.x = b;
        blockDim.x = block;
        gridDim.x = grid;
        kd_emu_block = &blk;
        f();
      });
    for (auto& th : threads) th.join();
  }
}

// ------------------------------------------------------------ byte counts --

// The buffers whose row loads and stores a run counts (up to 4, by address;
// what lies in none counts as the fifth, "other"), and the counts.
struct KdEmuTrack {
  const void* base[4];
  unsigned long long len[4];
  unsigned long long loaded[5];
  unsigned long long stored[5];
};

struct KdEmuBytes {
  const unsigned char* base[4] = {};
  unsigned long long len[4] = {};
  std::atomic<unsigned long long> loaded[5] = {}, stored[5] = {};
};
inline KdEmuBytes kd_emu_bytes;

inline void kd_emu_count(const void* p, unsigned long long n, bool store) {
  const auto* c = static_cast<const unsigned char*>(p);
  int id = 4;
  for (int i = 0; i < 4; ++i)
    if (kd_emu_bytes.base[i] && c >= kd_emu_bytes.base[i] && c < kd_emu_bytes.base[i] + kd_emu_bytes.len[i]) {
      id = i;
      break;
    }
  (store ? kd_emu_bytes.stored : kd_emu_bytes.loaded)[id].fetch_add(n, std::memory_order_relaxed);
}

// Starts counting for `t` (null: count nothing anyone reads).
inline void kd_emu_bytes_begin(const KdEmuTrack* t) {
  for (int i = 0; i < 4; ++i) {
    kd_emu_bytes.base[i] = t ? static_cast<const unsigned char*>(t->base[i]) : nullptr;
    kd_emu_bytes.len[i] = t ? t->len[i] : 0;
  }
  for (int i = 0; i < 5; ++i) {
    kd_emu_bytes.loaded[i] = 0;
    kd_emu_bytes.stored[i] = 0;
  }
}

// The counts since kd_emu_bytes_begin into `t` (if any).
inline void kd_emu_bytes_end(KdEmuTrack* t) {
  if (!t) return;
  for (int i = 0; i < 5; ++i) {
    t->loaded[i] = kd_emu_bytes.loaded[i].load();
    t->stored[i] = kd_emu_bytes.stored[i].load();
  }
}

// --------------------------------------------------------------- clusters --

struct KdEmuCluster {
  unsigned size = 1;
  unsigned long long smem_bytes = 0;
  std::vector<std::vector<uint4>> smem;  // each CTA's dynamic shared memory
  std::unique_ptr<std::barrier<>> bar;   // every thread of the cluster
  struct Shadow {
    long write_iv = -1;  // barrier interval of the last store (by the owner)
    long read_iv = -1;   // interval of the last loads, and who made them
    uint32_t readers = 0;
  };
  std::mutex mu;
  std::map<unsigned long long, Shadow> shadow;  // by owner · smem_bytes + offset
  std::vector<long> exit_iv;                    // interval in which each CTA left, or −1
  std::string race;                             // the first race found
};

inline thread_local KdEmuCluster* kd_emu_cluster = nullptr;
inline thread_local unsigned kd_emu_rank = 0;
inline thread_local long kd_emu_interval = 0;  // cluster barriers passed

inline unsigned char* kd_dyn_smem() {
  return reinterpret_cast<unsigned char*>(kd_emu_cluster->smem[kd_emu_rank].data());
}
inline unsigned kd_cluster_size() { return kd_emu_cluster ? kd_emu_cluster->size : 1u; }
inline unsigned kd_cluster_rank() { return kd_emu_rank; }

inline void kd_cluster_sync() {
  if (!kd_emu_cluster) return __syncthreads();
  kd_emu_cluster->bar->arrive_and_wait();
  ++kd_emu_interval;
}

inline void kd_emu_race(KdEmuCluster& c, const std::string& what) {
  if (c.race.empty()) c.race = what;
}

// Offset of `p` in this CTA's dynamic shared memory (a kernel bug otherwise).
inline unsigned long long kd_emu_smem_offset(const void* p, unsigned long long n) {
  const auto* base = reinterpret_cast<const unsigned char*>(kd_emu_cluster->smem[kd_emu_rank].data());
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < base || c + n > base + kd_emu_cluster->smem_bytes) {
    std::fprintf(stderr, "kd_dsmem access outside the CTA's dynamic shared memory\n");
    std::abort();
  }
  return (unsigned long long)(c - base);
}

template <typename T>
inline void kd_dsmem_store(T* p, const T& v) {
  KdEmuCluster& c = *kd_emu_cluster;
  const unsigned long long off = kd_emu_smem_offset(p, sizeof(T));
  std::lock_guard<std::mutex> lock(c.mu);
  auto& s = c.shadow[kd_emu_rank * c.smem_bytes + off];
  if (s.read_iv == kd_emu_interval && (s.readers & ~(1u << kd_emu_rank)))
    kd_emu_race(c, "CTA " + std::to_string(kd_emu_rank) + " stored shared-memory offset " +
                       std::to_string(off) + " that another CTA loaded since the last cluster barrier");
  s.write_iv = kd_emu_interval;
  std::memcpy(static_cast<void*>(p), &v, sizeof(T));
}

template <typename T>
inline T kd_dsmem_load(T* p, unsigned rank) {
  KdEmuCluster& c = *kd_emu_cluster;
  const unsigned long long off = kd_emu_smem_offset(p, sizeof(T));
  std::lock_guard<std::mutex> lock(c.mu);
  const auto* src = reinterpret_cast<const unsigned char*>(c.smem[rank].data()) + off;
  if (rank != kd_emu_rank) {
    auto& s = c.shadow[rank * c.smem_bytes + off];
    if (s.write_iv == kd_emu_interval)
      kd_emu_race(c, "CTA " + std::to_string(kd_emu_rank) + " loaded CTA " + std::to_string(rank) +
                         "'s shared-memory offset " + std::to_string(off) +
                         " stored since the last cluster barrier");
    if (c.exit_iv[rank] >= 0 && kd_emu_interval >= c.exit_iv[rank])
      kd_emu_race(c, "CTA " + std::to_string(kd_emu_rank) + " loaded the shared memory of CTA " +
                         std::to_string(rank) + ", which had left");
    if (s.read_iv != kd_emu_interval) {
      s.read_iv = kd_emu_interval;
      s.readers = 0;
    }
    s.readers |= 1u << kd_emu_rank;
  }
  T v;
  std::memcpy(&v, src, sizeof(T));
  return v;
}

// A CTA leaves: loads of its memory since its last cluster barrier raced.
inline void kd_emu_cta_exit() {
  KdEmuCluster& c = *kd_emu_cluster;
  std::lock_guard<std::mutex> lock(c.mu);
  c.exit_iv[kd_emu_rank] = kd_emu_interval;
  const unsigned long long lo = kd_emu_rank * c.smem_bytes, hi = lo + c.smem_bytes;
  for (auto it = c.shadow.lower_bound(lo); it != c.shadow.end() && it->first < hi; ++it)
    if (it->second.read_iv >= kd_emu_interval && (it->second.readers & ~(1u << kd_emu_rank)))
      kd_emu_race(c, "CTA " + std::to_string(kd_emu_rank) +
                         " left while another CTA could still load its shared memory");
}

// Runs f() as `grid` CTAs of `block` threads in clusters of `cluster` CTAs
// (grid a multiple of it), each CTA with `smem_bytes` of dynamic shared
// memory. Clusters run one after another, the CTAs of one at once. Returns
// the first race found, or an empty string.
template <typename F>
std::string kd_emu_launch_cluster(unsigned grid, unsigned block, unsigned cluster,
                                  unsigned long long smem_bytes, F f) {
  std::string race;
  for (unsigned c0 = 0; c0 < grid; c0 += cluster) {
    KdEmuCluster cl;
    cl.size = cluster;
    cl.smem_bytes = smem_bytes;
    uint4 poison{~0u, ~0u, ~0u, ~0u};
    cl.smem.assign(cluster, std::vector<uint4>((smem_bytes + 15) / 16, poison));
    cl.bar = std::make_unique<std::barrier<>>((std::ptrdiff_t)cluster * block);
    cl.exit_iv.assign(cluster, -1);
    std::vector<KdEmuBlock> blocks(cluster);
    for (auto& blk : blocks) {
      blk.block = std::make_unique<std::barrier<>>(block);
      for (unsigned w = 0; w < block / 32; ++w) blk.warps.push_back(std::make_unique<std::barrier<>>(32));
      blk.exchange.assign(block, 0);
    }
    std::vector<std::thread> threads;
    for (unsigned r = 0; r < cluster; ++r)
      for (unsigned t = 0; t < block; ++t)
        threads.emplace_back([=, &f, &cl, &blocks] {
          threadIdx.x = t;
          blockIdx.x = c0 + r;
          blockDim.x = block;
          gridDim.x = grid;
          kd_emu_block = &blocks[r];
          kd_emu_cluster = &cl;
          kd_emu_rank = r;
          kd_emu_interval = 0;
          f();
          if (t == 0) kd_emu_cta_exit();
          kd_emu_cluster = nullptr;
        });
    for (auto& th : threads) th.join();
    if (race.empty()) race = cl.race;
  }
  return race;
}
