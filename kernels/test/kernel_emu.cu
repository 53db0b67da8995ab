/*
 * kernel_emu.cu — the gather/scatter kernels run on the host, as a shared library
 * (build/kernels/liblmc_kernel_emu.so).
 *
 * The block body of kv_transfer.cuh is called once per (block, thread) of the grid, in order; the
 * kernels have no inter-thread communication, so this is exactly what a GPU computes. The
 * LMCacheNative.Cuda.Tests fake driver calls lmc_emu_launch where the real driver would run
 * cuLaunchKernel, so the whole C# CUDA path (layer tables, argument packing, launch geometry, vector
 * width choice) runs without a GPU. Every access is checked for the alignment its vector width needs:
 * on a GPU a misaligned vector access faults, on the host it would silently work.
 *
 * Built by build.sh with nvcc -ccbin clang-14 (host code only; the same header the kernels use).
 */
#include <stdint.h>
#include <string.h>

/* Defined before the header: its block body calls the hook for every access (host builds only). */
static thread_local int g_misaligned;
#define LMC_EMU_HOOK(paged, object, v)                                                          \
  do {                                                                                          \
    if ((((uintptr_t)(paged)) | ((uintptr_t)(object))) % (uintptr_t)(v) != 0) g_misaligned++; \
  } while (0)

#include "../kv_transfer.cuh"

template <int V, bool kGather>
static void emulate(const lmc_k_params &p, uint32_t gx, uint32_t gy, uint32_t gz, uint32_t threads) {
  for (uint32_t z = 0; z < gz; z++)
    for (uint32_t y = 0; y < gy; y++)
      for (uint32_t x = 0; x < gx; x++)
        for (uint32_t thread = 0; thread < threads; thread++) lmc_kv_transfer_block<V, kGather>(p, x, y, z, thread, threads);
}

extern "C" {

/* Runs kernel `name` over grid (gx, gy, gz) with `threads` threads per block. Returns 0, -1 for an
 * unknown kernel name, -2 for a bad geometry, or -3 when an access was not aligned to V. */
__attribute__((visibility("default"))) int lmc_emu_launch(const char *name, uint32_t gx, uint32_t gy, uint32_t gz,
                                                          uint32_t threads, const lmc_k_params *params) {
  if (name == NULL || params == NULL) return -1;
  if (threads == 0 || threads > 1024 || gy != (uint32_t)params->num_layers || gz != (uint32_t)params->kv_count) return -2;
  g_misaligned = 0;
#define LMC_EMU_CASE(V, GATHER, NAME)                        \
  if (strcmp(name, #NAME) == 0) {                            \
    emulate<V, GATHER>(*params, gx, gy, gz, threads);        \
    return g_misaligned ? -3 : 0;                            \
  }
  LMC_KV_TRANSFER_KERNELS(LMC_EMU_CASE)
#undef LMC_EMU_CASE
  return -1;
}

/* Size of the parameter struct this library was compiled with (the C# mirror must agree). */
__attribute__((visibility("default"))) int lmc_emu_params_size(void) { return (int)sizeof(lmc_k_params); }

} /* extern "C" */
