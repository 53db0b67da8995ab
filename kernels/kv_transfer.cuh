/*
 * kv_transfer.cuh — addressing and per-block body of the KV gather/scatter kernels.
 *
 * Everything here is __host__ __device__: kv_transfer.cu wraps the block body in the __global__
 * entry points, and kernels/test/ runs the very same code on the host (one call per block and
 * thread of the grid) to compare it byte for byte with the library's C# reference copy. Nothing in
 * this file depends on the CUDA runtime; compiled by a host compiler without nvcc, __host__ /
 * __device__ expand to nothing and the vector types are defined here.
 *
 * Shapes (see lmc_kernel_abi.h for the parameter struct):
 *   paged layer l    element (kv, block, token, head, d) at
 *                    layers[l].base + kv*kv_stride + block*block_stride + token*token_stride
 *                                   + head*head_stride + d*elem_size          (strides in bytes)
 *   chunk object     [kv_count][num_layers][T][row_bytes], row_bytes = heads * head_size * elem_size
 *   slot mapping     slot = block * block_size + token; -1 = the token has no slot (skipped)
 *
 * Grid / block <-> data mapping of one launch (one launch moves a whole request: all layers, K and
 * V, every token of every chunk):
 *   blockIdx.x  = chunk * chunk_tokens + t     token t of chunk `chunk` (blocks with t >= T exit)
 *   blockIdx.y  = layer                        0 .. num_layers - 1
 *   blockIdx.z  = kv                           0 .. kv_count - 1
 *   threadIdx.x strides over the row's segs_per_row * units_per_seg vector units of V bytes;
 *               unit u is byte (u % units_per_seg) * V of segment (head) u / units_per_seg.
 * A block therefore copies exactly one row (one token's K or V of one layer): contiguous in the chunk
 * object, one run (NHD, MLA) or num_kv_heads runs head_stride apart (HND, packed) in the paged layer.
 *
 * Element sizes 1, 2 and 4 are all copied as bytes: the launcher picks V, the largest power of two
 * <= 16 that divides every address, stride and length involved (lmc_k_vector_width), so every access
 * is naturally aligned: 16-byte accesses whenever the layout allows, 8/4/2/1-byte ones otherwise.
 */
#ifndef LMC_KV_TRANSFER_CUH
#define LMC_KV_TRANSFER_CUH

#include "lmc_kernel_abi.h"

#if defined(__CUDACC__)
#define LMC_HD __host__ __device__ __forceinline__
#else
#define LMC_HD inline
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
#endif

/* The unit type of each vector width. */
template <int V> struct lmc_unit;
template <> struct lmc_unit<16> { typedef uint4 type; };
template <> struct lmc_unit<8> { typedef uint2 type; };
template <> struct lmc_unit<4> { typedef unsigned int type; };
template <> struct lmc_unit<2> { typedef unsigned short type; };
template <> struct lmc_unit<1> { typedef unsigned char type; };

/* Read-only load through the non-coherent cache on the device (the paged cache is not written
 * during a gather); a plain load on the host. */
template <typename T> LMC_HD T lmc_load_nc(const T *p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

/* Byte offset, from the layer's base, of row (kv, slot): head 0, d 0 of that token's K or V. */
LMC_HD int64_t lmc_paged_row_offset(const lmc_k_layer &layer, int32_t kv, int64_t slot, int32_t block_size) {
  // Slots are < 2^31 (the launcher refuses larger caches): a 32-bit division, not a 64-bit subroutine.
  const int64_t block = (int64_t)((uint32_t)slot / (uint32_t)block_size);
  const int64_t token = slot - block * block_size;
  return (int64_t)kv * layer.kv_stride + block * layer.block_stride + token * layer.token_stride;
}

/* Byte offset, from the chunk object's start, of row (kv, layer, t) in [kv][layers][T][row_bytes]. */
LMC_HD int64_t lmc_chunk_row_offset(int32_t kv, int32_t layer, int32_t num_layers, int32_t t, int32_t token_count,
                                    int64_t row_bytes) {
  return (((int64_t)kv * num_layers + layer) * token_count + t) * row_bytes;
}

/* Byte offsets of vector unit u within a row: paged side (segments head_stride apart) and chunk side
 * (segments adjacent). */
LMC_HD int64_t lmc_paged_unit_offset(const lmc_k_params &p, const lmc_k_layer &layer, uint32_t u, int32_t v) {
  const uint32_t seg = u / (uint32_t)p.units_per_seg;
  const uint32_t k = u - seg * (uint32_t)p.units_per_seg;
  return (int64_t)seg * layer.head_stride + (int64_t)k * v;
}
LMC_HD int64_t lmc_chunk_unit_offset(const lmc_k_params &p, uint32_t u, int32_t v) {
  const uint32_t seg = u / (uint32_t)p.units_per_seg;
  const uint32_t k = u - seg * (uint32_t)p.units_per_seg;
  return (int64_t)seg * p.seg_bytes + (int64_t)k * v;
}

/*
 * The work of one thread block (see the mapping above). kGather: paged layers -> chunk objects
 * (store); otherwise chunk objects -> paged layers (scatter, retrieve). Nothing is written for tokens
 * before first_token_to_write, tokens whose slot is -1 (any negative slot), or t >= T.
 */
template <int V, bool kGather>
LMC_HD void lmc_kv_transfer_block(const lmc_k_params &p, uint32_t block_x, uint32_t layer_index, uint32_t kv,
                                  uint32_t thread, uint32_t threads) {
  typedef typename lmc_unit<V>::type unit;
  const int32_t c = (int32_t)(block_x / (uint32_t)p.chunk_tokens);
  const int32_t t = (int32_t)(block_x - (uint32_t)c * (uint32_t)p.chunk_tokens);
  const lmc_k_chunk chunk = p.chunks[c];
  if (t >= chunk.token_count) return;
  const int64_t token = (int64_t)chunk.first_token + t;
  if (token < p.first_token_to_write) return;
  const int64_t slot = p.slots[token - p.slot_base];
  if (slot < 0) return;

  const lmc_k_layer layer = p.layers[layer_index];
  char *const paged = (char *)(uintptr_t)layer.base + lmc_paged_row_offset(layer, (int32_t)kv, slot, p.block_size);
  char *const object = (char *)(uintptr_t)chunk.data +
                       lmc_chunk_row_offset((int32_t)kv, (int32_t)layer_index, p.num_layers, t, chunk.token_count,
                                            p.row_bytes);
  const uint32_t units = (uint32_t)p.segs_per_row * (uint32_t)p.units_per_seg;
#if defined(__CUDA_ARCH__)
#pragma unroll 1
#endif
  for (uint32_t u = thread; u < units; u += threads) {
    unit *const paged_unit = (unit *)(paged + lmc_paged_unit_offset(p, layer, u, V));
    unit *const object_unit = (unit *)(object + lmc_chunk_unit_offset(p, u, V));
#if !defined(__CUDA_ARCH__) && defined(LMC_EMU_HOOK)
    LMC_EMU_HOOK(paged_unit, object_unit, V); /* host emulation only: alignment and bounds checks */
#endif
    if (kGather)
      *object_unit = lmc_load_nc(paged_unit);
    else
      *paged_unit = *object_unit;
  }
}

/* Calls F(V, gather, name) for every kernel the fatbin holds: the one table of specialisations,
 * shared by the entry points and the host emulation. Names: lmc_kv_<gather|scatter>_v<V>. */
#define LMC_KV_TRANSFER_KERNELS(F) \
  F(16, true, lmc_kv_gather_v16)   \
  F(8, true, lmc_kv_gather_v8)     \
  F(4, true, lmc_kv_gather_v4)     \
  F(2, true, lmc_kv_gather_v2)     \
  F(1, true, lmc_kv_gather_v1)     \
  F(16, false, lmc_kv_scatter_v16) \
  F(8, false, lmc_kv_scatter_v8)   \
  F(4, false, lmc_kv_scatter_v4)   \
  F(2, false, lmc_kv_scatter_v2)   \
  F(1, false, lmc_kv_scatter_v1)

#endif /* LMC_KV_TRANSFER_CUH */
