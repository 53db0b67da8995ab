/* quickstart.c: store a prompt's KV with LMCacheNative, look it up, retrieve it bit-exact.
 * The KV cache is FlashAttention NHD [2, blocks, block_size, heads, head_size], fp16, in host
 * memory; see examples/README.md for how to build and run it. */
#include "lmcache_native.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { LAYERS = 2, BLOCKS = 16, BLOCK = 16, HEADS = 4, DIM = 64, TOKENS = 100 };
#define ELEMS ((size_t)2 * BLOCKS * BLOCK * HEADS * DIM) /* elements of one layer */

static int fail(const char *what) {
  fprintf(stderr, "%s failed: %s\n", what, lmc_last_error_message());
  return 1;
}

/* One layer per malloc'd buffer; strides in elements, as torch's Tensor.stride() reports them. */
static lmc_status register_cache(lmc_engine *engine, uint16_t *cache[LAYERS]) {
  lmc_kv_layer_desc d[LAYERS];
  int l;
  for (l = 0; l < LAYERS; l++) {
    memset(&d[l], 0, sizeof d[l]);
    d[l].struct_size = sizeof d[l];
    d[l].device_kind = LMC_DEVICE_HOST;
    d[l].elem_size = 2; /* fp16 */
    d[l].kv_count = 2;  /* K and V */
    d[l].num_blocks = BLOCKS, d[l].block_size = BLOCK;
    d[l].num_kv_heads = HEADS, d[l].head_size = DIM;
    d[l].base_address = (uint64_t)(uintptr_t)cache[l];
    d[l].span_bytes = ELEMS * 2;
    d[l].kv_stride = (int64_t)BLOCKS * BLOCK * HEADS * DIM;
    d[l].block_stride = (int64_t)BLOCK * HEADS * DIM;
    d[l].token_stride = HEADS * DIM;
    d[l].head_stride = DIM;
  }
  return lmc_engine_register_layers(engine, d, LAYERS);
}

int main(void) {
  uint16_t *a[LAYERS], *b[LAYERS];
  int32_t tokens[TOKENS], blocks[] = {3, 7, 1, 12, 5, 9, 0}; /* the prompt's blocks, in order */
  lmc_engine *engine;
  lmc_request req;
  lmc_lookup_result found = {sizeof(lmc_lookup_result), 0, 0, {0}, 0};
  lmc_transfer_result done = {sizeof(lmc_transfer_result), 0, 0, 0, 0, 0, {0}, 0};
  size_t i;
  int l, t;
  printf("LMCacheNative %s (ABI %d)\n", lmc_version_string(), (int)lmc_abi_version());
  if (lmc_abi_version() != LMC_ABI_VERSION) return fail("ABI version check");
  for (l = 0; l < LAYERS; l++) {
    a[l] = malloc(ELEMS * 2);
    b[l] = calloc(ELEMS, 2);
    if (!a[l] || !b[l]) return 1;
    for (i = 0; i < ELEMS; i++) a[l][i] = (uint16_t)(i * 31 + l); /* stand-in for computed KV */
  }
  for (t = 0; t < TOKENS; t++) tokens[t] = 1000 + t * 7;

  if (lmc_engine_create(&engine, "{\"chunk_size\": 32, \"max_local_cpu_size\": 0.1}",
                        "quickstart-model", 1, 0) != LMC_OK)
    return fail("lmc_engine_create");
  if (register_cache(engine, a) != LMC_OK) return fail("lmc_engine_register_layers");

  /* One request: the tokens and where their KV lives (a block table; a slot mapping works too). */
  memset(&req, 0, sizeof req);
  req.struct_size = sizeof req;
  req.destination_kind = LMC_DESTINATION_BLOCK_TABLE;
  req.tokens = tokens, req.num_tokens = TOKENS;
  req.block_ids = blocks, req.num_block_ids = sizeof blocks / sizeof blocks[0];
  req.table_block_size = BLOCK;

  if (lmc_store(&done, engine, &req, NULL) != LMC_OK) return fail("lmc_store");
  printf("stored %lld tokens (%lld bytes of KV)\n", (long long)done.tokens_matched,
         (long long)done.bytes_copied);
  if (lmc_lookup(&found, engine, &req) != LMC_OK) return fail("lmc_lookup");
  printf("lookup: %lld of %d tokens cached (whole 32-token chunks)\n",
         (long long)found.hit_tokens, TOKENS);

  /* Retrieve into a second, zeroed cache: same shapes, so the cache survives re-registering. */
  if (register_cache(engine, b) != LMC_OK) return fail("lmc_engine_register_layers (second)");
  if (lmc_retrieve(&done, engine, &req, NULL) != LMC_OK) return fail("lmc_retrieve");
  printf("retrieved %lld tokens into the second cache\n", (long long)done.tokens_copied);

  for (l = 0; l < LAYERS; l++) /* the retrieved blocks must match the stored ones bit for bit */
    for (t = 0; t < found.hit_tokens; t++) {
      size_t kv, tok = (size_t)blocks[t / BLOCK] * BLOCK + (size_t)(t % BLOCK);
      for (kv = 0; kv < 2; kv++) {
        size_t at = kv * (ELEMS / 2) + tok * HEADS * DIM;
        if (memcmp(a[l] + at, b[l] + at, HEADS * DIM * 2) != 0) {
          fprintf(stderr, "mismatch: layer %d token %d\n", l, t);
          return 1;
        }
      }
    }
  printf("bit-exact: OK\n");
  lmc_engine_destroy(engine);
  for (l = 0; l < LAYERS; l++) free(a[l]), free(b[l]);
  return found.hit_tokens == 96 && done.tokens_copied == 96 ? 0 : 1; /* 3 chunks of 32 */
}
