/*
 * kv_transfer.cu — the gather (paged KV layers -> chunk objects, for a store) and scatter (chunk
 * objects -> paged KV layers, for a retrieve) kernels of LMCacheNative.
 *
 * One launch moves one whole request: every layer, K and V, every token of every chunk.
 *
 *   kernel                    lmc_kv_<gather|scatter>_v<V>(lmc_k_params p)   (extern "C", by value)
 *   V                         16, 8, 4, 2, 1: bytes per access, chosen by the launcher as the largest
 *                             power of two <= 16 dividing every address, stride and length involved
 *                             (so fp8/fp16/bf16/fp32 are all plain byte copies, 16-byte vectorised
 *                             wherever the layout allows, narrower accesses where it does not)
 *   grid                      (num_chunks * chunk_tokens, num_layers, kv_count)
 *                             x = chunk * chunk_tokens + t: token t of that chunk (t >= T exits)
 *                             y = layer, z = kv (0 = K, 1 = V)
 *   block                     lmc_k_block_threads(segs_per_row * units_per_seg) threads: 32..128
 *                             thread i copies units i, i + blockDim.x, ... of the block's row
 *   paged layers  [layers]    p.layers[l]: base + kv*kv_stride + block*block_stride
 *                             + token*token_stride + head*head_stride + byte      (bytes, int64)
 *   chunk object  [kv][L][T][row_bytes]  at p.chunks[c].data (pinned mapped host or device staging)
 *   slot mapping  int64       p.slots[token - slot_base]; -1 = no slot, skipped
 *   first_token_to_write      tokens before it are never copied (their slots are not ours to write)
 *
 * Addressing lives in kv_transfer.cuh as __host__ __device__ functions, which the host test runs
 * over random layouts against the C# reference copy. Kernels never validate: the C# engine checked
 * every slot and layout before the launch (only the slot < 0 skip is the kernels' own).
 */
#include "kv_transfer.cuh"

#define LMC_DEFINE_KERNEL(V, GATHER, NAME)                                                  \
  extern "C" __global__ void __launch_bounds__(128) NAME(const lmc_k_params p) {           \
    lmc_kv_transfer_block<V, GATHER>(p, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x,    \
                                     blockDim.x);                                           \
  }

LMC_KV_TRANSFER_KERNELS(LMC_DEFINE_KERNEL)
