/*
 * lmc_kernel_abi.h — the plain-old-data structs shared by the CUDA kernels (kernels/ *.cu files), their host
 * emulation (kernels/test/) and the C# launcher (src/LMCacheNative.Cuda/KernelAbi.cs, pinned by
 * NUnit size/offset tests). Plain C, no CUDA headers: host code of any compiler includes it.
 *
 * Units: every address is a device-accessible byte address (device memory, or pinned mapped host
 * memory, whose device address equals its host address under UVA); every stride and length is in
 * BYTES (the C ABI's lmc_kv_layer_desc strides are in elements and are multiplied by elem_size when
 * the layer table is built). All offsets are 64-bit.
 */
#ifndef LMC_KERNEL_ABI_H
#define LMC_KERNEL_ABI_H

#include <stdint.h>

/*
 * One registered layer: where element (kv 0, block 0, token 0, head 0, d 0) is and the byte strides
 * of lmc_kv_layer_desc. 40 bytes. The table of all layers ([num_layers] of these) is uploaded to device
 * memory once, when the layers are registered, and read by every launch.
 */
typedef struct lmc_k_layer {
  uint64_t base;         /* byte address of the layer's element (0, 0, 0, 0, 0) */
  int64_t kv_stride;     /* bytes between K and V (unused when kv_count == 1) */
  int64_t block_stride;  /* bytes between consecutive blocks */
  int64_t token_stride;  /* bytes between consecutive tokens (slots) of one block */
  int64_t head_stride;   /* bytes between consecutive heads (unused when a token's heads are one run) */
} lmc_k_layer;

/*
 * One chunk object of a transfer. 16 bytes. The object is LMCache's KV_2LTD format:
 * [kv_count][num_layers][token_count][row_bytes], row_bytes = num_kv_heads * head_size * elem_size.
 */
typedef struct lmc_k_chunk {
  uint64_t data;       /* byte address of the chunk object (pinned host memory or a device staging buffer) */
  int32_t first_token; /* request token index of the chunk's token 0 */
  int32_t token_count; /* T: tokens in this chunk (a partial last chunk has fewer than chunk_tokens) */
} lmc_k_chunk;

/*
 * The single kernel parameter, passed by value. 80 bytes.
 *
 * A row is one token's K (or V) of one layer: row_bytes bytes in the chunk object, split into
 * segs_per_row segments of seg_bytes that are contiguous on the paged side too: one segment per row
 * when the heads of a token are adjacent (NHD, MLA), one per head otherwise (HND, packed), the
 * segments then head_stride bytes apart. Each segment is copied in units_per_seg units of the launch's
 * vector width V (16, 8, 4, 2 or 1 bytes): seg_bytes == units_per_seg * V.
 */
typedef struct lmc_k_params {
  const lmc_k_layer *layers;    /* device [num_layers]: uploaded at registration */
  const lmc_k_chunk *chunks;    /* device [num_chunks] */
  const int64_t *slots;         /* device: slots[i] = slot of request token slot_base + i; -1 = none */
  int64_t slot_base;            /* request token index of slots[0] */
  int64_t first_token_to_write; /* tokens before it are not copied (scatter: their slots belong to the engine) */
  int64_t row_bytes;            /* num_kv_heads * head_size * elem_size */
  int64_t seg_bytes;            /* row_bytes (heads adjacent) or head_size * elem_size */
  int32_t num_layers;           /* grid.y */
  int32_t kv_count;             /* grid.z: 2 (K, V) or 1 (MLA) */
  int32_t block_size;           /* tokens per block of the paged cache: slot = block * block_size + token */
  int32_t chunk_tokens;         /* grid.x blocks per chunk: the tokens of a full chunk */
  int32_t segs_per_row;         /* 1 or num_kv_heads */
  int32_t units_per_seg;        /* seg_bytes / V */
} lmc_k_params;

/* Largest power of two <= 16 that divides every value OR-ed into `bits` (all addresses, strides and
 * lengths a launch touches): the vector width V of the launch. 0 (nothing to align) gives 16. */
static inline int lmc_k_vector_width(uint64_t bits) {
  return (bits & 15u) == 0 ? 16 : (bits & 7u) == 0 ? 8 : (bits & 3u) == 0 ? 4 : (bits & 1u) == 0 ? 2 : 1;
}

/* Threads per block for a row of `units` vector units: whole warps, at most 128 (one pass over a
 * 2 KiB row at V = 16; longer rows loop). */
static inline int lmc_k_block_threads(int64_t units) {
  int64_t warps = (units + 31) / 32;
  if (warps < 1) warps = 1;
  if (warps > 4) warps = 4;
  return (int)(warps * 32);
}

#endif /* LMC_KERNEL_ABI_H */
