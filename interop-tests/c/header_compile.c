/*
 * header_compile.c — compile test for include/lmcache_native.h.
 *
 * run.sh compiles this file as C99, C11 (gcc, clang-14) and C++17 (g++, clang++-14) with
 * -Wall -Wextra -Werror -pedantic. It pins:
 *  - the struct layouts shared with C# and ctypes (sizeof/offsetof, checked at compile time);
 *  - the status and device values, which are part of the ABI and must never be renumbered;
 *  - each function's prototype, by assigning it to a pointer of the expected type (a changed
 *    signature fails to compile, so an ABI change cannot slip in unnoticed).
 * Linked against the library and run, it also prints the layout, for the C# layout tests to copy.
 */
#include "lmcache_native.h"

#include <stddef.h>
#include <stdio.h>

#if defined(__cplusplus)
#define LMC_TEST_ASSERT(cond, msg) static_assert(cond, msg)
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#define LMC_TEST_ASSERT(cond, msg) _Static_assert(cond, msg)
#else
/* C99 has no static assertion: a negative array size fails instead. */
#define LMC_TEST_CAT2(a, b) a##b
#define LMC_TEST_CAT(a, b) LMC_TEST_CAT2(a, b)
#define LMC_TEST_ASSERT(cond, msg) \
  typedef char LMC_TEST_CAT(lmc_static_assert_line_, __LINE__)[(cond) ? 1 : -1]
#endif

/* lmc_kv_layer_desc: 88 bytes, naturally aligned, no implicit padding. */
LMC_TEST_ASSERT(sizeof(lmc_kv_layer_desc) == 88, "sizeof(lmc_kv_layer_desc) must be 88");
LMC_TEST_ASSERT(offsetof(lmc_kv_layer_desc, struct_size) == 0, "struct_size at 0");
LMC_TEST_ASSERT(offsetof(lmc_kv_layer_desc, device_kind) == 4, "device_kind at 4");
LMC_TEST_ASSERT(offsetof(lmc_kv_layer_desc, device_index) == 8, "device_index at 8");
LMC_TEST_ASSERT(offsetof(lmc_kv_layer_desc, elem_size) == 12, "elem_size at 12");
LMC_TEST_ASSERT(offsetof(lmc_kv_layer_desc, kv_count) == 16, "kv_count at 16");
LMC_TEST_ASSERT(offsetof(lmc_kv_layer_desc, num_blocks) == 20, "num_blocks at 20");
LMC_TEST_ASSERT(offsetof(lmc_kv_layer_desc, block_size) == 24, "block_size at 24");
LMC_TEST_ASSERT(offsetof(lmc_kv_layer_desc, num_kv_heads) == 28, "num_kv_heads at 28");
LMC_TEST_ASSERT(offsetof(lmc_kv_layer_desc, head_size) == 32, "head_size at 32");
LMC_TEST_ASSERT(offsetof(lmc_kv_layer_desc, reserved) == 36, "reserved at 36");
LMC_TEST_ASSERT(offsetof(lmc_kv_layer_desc, base_address) == 40, "base_address at 40");
LMC_TEST_ASSERT(offsetof(lmc_kv_layer_desc, span_bytes) == 48, "span_bytes at 48");
LMC_TEST_ASSERT(offsetof(lmc_kv_layer_desc, kv_stride) == 56, "kv_stride at 56");
LMC_TEST_ASSERT(offsetof(lmc_kv_layer_desc, block_stride) == 64, "block_stride at 64");
LMC_TEST_ASSERT(offsetof(lmc_kv_layer_desc, token_stride) == 72, "token_stride at 72");
LMC_TEST_ASSERT(offsetof(lmc_kv_layer_desc, head_stride) == 80, "head_stride at 80");

/* lmc_stats: 128 bytes = 8-byte header + 15 uint64 counters. */
LMC_TEST_ASSERT(sizeof(lmc_stats) == 128, "sizeof(lmc_stats) must be 128");
LMC_TEST_ASSERT(sizeof(lmc_tier_stats) == 136, "sizeof(lmc_tier_stats) must be 136");
LMC_TEST_ASSERT(offsetof(lmc_tier_stats, hits) == 40, "lmc_tier_stats.hits at 40");
LMC_TEST_ASSERT(offsetof(lmc_stats, struct_size) == 0, "stats.struct_size at 0");
LMC_TEST_ASSERT(offsetof(lmc_stats, reserved) == 4, "stats.reserved at 4");
LMC_TEST_ASSERT(offsetof(lmc_stats, lookup_requests) == 8, "lookup_requests at 8");
LMC_TEST_ASSERT(offsetof(lmc_stats, stored_bytes) == 48, "stored_bytes at 48");
LMC_TEST_ASSERT(offsetof(lmc_stats, retrieved_bytes) == 80, "retrieved_bytes at 80");
LMC_TEST_ASSERT(offsetof(lmc_stats, pool_capacity_bytes) == 120, "pool_capacity_bytes at 120");

/* lmc_request: 88 bytes on LP64 (x86-64, aarch64): pointers and int64 at 8-byte offsets. */
#if UINTPTR_MAX == 0xFFFFFFFFFFFFFFFFu
LMC_TEST_ASSERT(sizeof(lmc_request) == 88, "sizeof(lmc_request) must be 88");
LMC_TEST_ASSERT(offsetof(lmc_request, struct_size) == 0, "request.struct_size at 0");
LMC_TEST_ASSERT(offsetof(lmc_request, destination_kind) == 4, "request.destination_kind at 4");
LMC_TEST_ASSERT(offsetof(lmc_request, tokens) == 8, "request.tokens at 8");
LMC_TEST_ASSERT(offsetof(lmc_request, num_tokens) == 16, "request.num_tokens at 16");
LMC_TEST_ASSERT(offsetof(lmc_request, extra_key) == 24, "request.extra_key at 24");
LMC_TEST_ASSERT(offsetof(lmc_request, extra_key_len) == 32, "request.extra_key_len at 32");
LMC_TEST_ASSERT(offsetof(lmc_request, first_token) == 40, "request.first_token at 40");
LMC_TEST_ASSERT(offsetof(lmc_request, slot_mapping) == 48, "request.slot_mapping at 48");
LMC_TEST_ASSERT(offsetof(lmc_request, block_ids) == 56, "request.block_ids at 56");
LMC_TEST_ASSERT(offsetof(lmc_request, num_block_ids) == 64, "request.num_block_ids at 64");
LMC_TEST_ASSERT(offsetof(lmc_request, table_block_size) == 72, "request.table_block_size at 72");
LMC_TEST_ASSERT(offsetof(lmc_request, reserved) == 76, "request.reserved at 76");
LMC_TEST_ASSERT(offsetof(lmc_request, stream) == 80, "request.stream at 80");
#endif

/* lmc_transfer_result: 80 bytes = 8-byte header + 4 int64 + 4 per-tier int64 + elapsed_ns. */
LMC_TEST_ASSERT(LMC_MAX_TIERS == 4, "LMC_MAX_TIERS");
LMC_TEST_ASSERT(sizeof(lmc_transfer_result) == 80, "sizeof(lmc_transfer_result) must be 80");
LMC_TEST_ASSERT(offsetof(lmc_transfer_result, struct_size) == 0, "transfer.struct_size at 0");
LMC_TEST_ASSERT(offsetof(lmc_transfer_result, reserved) == 4, "transfer.reserved at 4");
LMC_TEST_ASSERT(offsetof(lmc_transfer_result, tokens_matched) == 8, "tokens_matched at 8");
LMC_TEST_ASSERT(offsetof(lmc_transfer_result, tokens_copied) == 16, "tokens_copied at 16");
LMC_TEST_ASSERT(offsetof(lmc_transfer_result, bytes_copied) == 24, "bytes_copied at 24");
LMC_TEST_ASSERT(offsetof(lmc_transfer_result, chunks_skipped_for_space) == 32,
                "chunks_skipped_for_space at 32");
LMC_TEST_ASSERT(offsetof(lmc_transfer_result, chunks_by_tier) == 40, "chunks_by_tier at 40");
LMC_TEST_ASSERT(offsetof(lmc_transfer_result, elapsed_ns) == 72, "transfer.elapsed_ns at 72");

/* lmc_lookup_result: 56 bytes = 8-byte header + hit_tokens + 4 per-tier int64 + elapsed_ns. */
LMC_TEST_ASSERT(sizeof(lmc_lookup_result) == 56, "sizeof(lmc_lookup_result) must be 56");
LMC_TEST_ASSERT(offsetof(lmc_lookup_result, struct_size) == 0, "lookup.struct_size at 0");
LMC_TEST_ASSERT(offsetof(lmc_lookup_result, reserved) == 4, "lookup.reserved at 4");
LMC_TEST_ASSERT(offsetof(lmc_lookup_result, hit_tokens) == 8, "hit_tokens at 8");
LMC_TEST_ASSERT(offsetof(lmc_lookup_result, tokens_by_tier) == 16, "tokens_by_tier at 16");
LMC_TEST_ASSERT(offsetof(lmc_lookup_result, elapsed_ns) == 48, "lookup.elapsed_ns at 48");

/* Fixed-width typedefs. */
LMC_TEST_ASSERT(sizeof(lmc_status) == 4, "lmc_status is int32_t");
LMC_TEST_ASSERT(sizeof(lmc_device_kind) == 4, "lmc_device_kind is int32_t");
LMC_TEST_ASSERT(sizeof(lmc_destination_kind) == 4, "lmc_destination_kind is int32_t");

/* Pinned values. */
LMC_TEST_ASSERT(LMC_OK == 0, "LMC_OK");
LMC_TEST_ASSERT(LMC_E_INVALID_ARGUMENT == -1, "LMC_E_INVALID_ARGUMENT");
LMC_TEST_ASSERT(LMC_E_INVALID_HANDLE == -2, "LMC_E_INVALID_HANDLE");
LMC_TEST_ASSERT(LMC_E_UNSUPPORTED == -3, "LMC_E_UNSUPPORTED");
LMC_TEST_ASSERT(LMC_E_OUT_OF_MEMORY == -4, "LMC_E_OUT_OF_MEMORY");
LMC_TEST_ASSERT(LMC_E_NOT_FOUND == -5, "LMC_E_NOT_FOUND");
LMC_TEST_ASSERT(LMC_E_IO == -6, "LMC_E_IO");
LMC_TEST_ASSERT(LMC_E_CUDA == -7, "LMC_E_CUDA");
LMC_TEST_ASSERT(LMC_E_NO_DEVICE == -8, "LMC_E_NO_DEVICE");
LMC_TEST_ASSERT(LMC_E_BUFFER_TOO_SMALL == -9, "LMC_E_BUFFER_TOO_SMALL");
LMC_TEST_ASSERT(LMC_E_INTERNAL == -10, "LMC_E_INTERNAL");
LMC_TEST_ASSERT(LMC_E_TIMEOUT == -11, "LMC_E_TIMEOUT");
LMC_TEST_ASSERT(LMC_DEVICE_HOST == 0, "LMC_DEVICE_HOST");
LMC_TEST_ASSERT(LMC_DEVICE_CUDA == 1, "LMC_DEVICE_CUDA");
LMC_TEST_ASSERT(LMC_DESTINATION_SLOTS == 0, "LMC_DESTINATION_SLOTS");
LMC_TEST_ASSERT(LMC_DESTINATION_BLOCK_TABLE == 1, "LMC_DESTINATION_BLOCK_TABLE");
LMC_TEST_ASSERT(LMC_VERSION_NUMBER ==
                    LMC_VERSION_MAJOR * 10000 + LMC_VERSION_MINOR * 100 + LMC_VERSION_PATCH,
                "LMC_VERSION_NUMBER");
LMC_TEST_ASSERT(LMC_ABI_VERSION == 2, "LMC_ABI_VERSION");
LMC_TEST_ASSERT(sizeof(lmc_kv_event) == 104, "sizeof(lmc_kv_event) must be 104");
LMC_TEST_ASSERT(offsetof(lmc_kv_event, block_hash) == 16, "lmc_kv_event.block_hash at 16");
LMC_TEST_ASSERT(offsetof(lmc_kv_event, parent_hash) == 48, "lmc_kv_event.parent_hash at 48");
LMC_TEST_ASSERT(offsetof(lmc_kv_event, parent_hash_len) == 80, "lmc_kv_event.parent_hash_len at 80");
LMC_TEST_ASSERT(offsetof(lmc_kv_event, token_ids_offset) == 88, "lmc_kv_event.token_ids_offset at 88");
LMC_TEST_ASSERT(LMC_KV_EVENT_BLOCK_STORED == 1, "LMC_KV_EVENT_BLOCK_STORED");
LMC_TEST_ASSERT(LMC_KV_EVENT_BLOCK_REMOVED == 2, "LMC_KV_EVENT_BLOCK_REMOVED");
LMC_TEST_ASSERT(LMC_KV_EVENT_ALL_BLOCKS_CLEARED == 3, "LMC_KV_EVENT_ALL_BLOCKS_CLEARED");
LMC_TEST_ASSERT(LMC_KV_MEDIUM_CPU == 1, "LMC_KV_MEDIUM_CPU");
LMC_TEST_ASSERT(LMC_KV_MEDIUM_DISK == 2, "LMC_KV_MEDIUM_DISK");
LMC_TEST_ASSERT(LMC_KV_MEDIUM_REMOTE == 3, "LMC_KV_MEDIUM_REMOTE");

/* The prototypes, one pointer each: every LMC_API function of the header, in header order. Keep
 * in step with the header: a mismatch is an ABI change. */
struct lmc_test_prototypes {
  int32_t (*version_number)(void);
  int32_t (*abi_version)(void);
  const char *(*version_string)(void);
  const char *(*status_name)(lmc_status);
  const char *(*last_error_message)(void);
  lmc_status (*engine_create)(lmc_engine **, const char *, const char *, int32_t, int32_t);
  void (*engine_destroy)(lmc_engine *);
  lmc_status (*engine_get_config)(int64_t *, lmc_engine *, char *, int64_t);
  lmc_status (*config_schema)(int64_t *, char *, int64_t);
  lmc_status (*engine_register_layers)(lmc_engine *, const lmc_kv_layer_desc *, int32_t);
  lmc_status (*lookup)(lmc_lookup_result *, lmc_engine *, const lmc_request *);
  lmc_status (*store)(lmc_transfer_result *, lmc_engine *, const lmc_request *, lmc_job **);
  lmc_status (*retrieve)(lmc_transfer_result *, lmc_engine *, const lmc_request *, lmc_job **);
  lmc_status (*lookup_server_start)(lmc_engine *, const char *);
  lmc_status (*lookup_server_stop)(lmc_engine *);
  lmc_status (*remote_lookup)(int64_t *, const char *, const int32_t *, int64_t, const uint8_t *,
                              int64_t, int64_t);
  lmc_status (*prefetch_start)(lmc_job **, lmc_engine *, const lmc_request *);
  lmc_status (*job_wait)(lmc_transfer_result *, lmc_job *, int64_t);
  lmc_status (*job_poll)(int32_t *, lmc_job *);
  lmc_status (*job_result)(lmc_transfer_result *, lmc_job *);
  void (*job_destroy)(lmc_job *);
  lmc_status (*cuda_device_count)(int32_t *);
  lmc_status (*engine_get_stats)(lmc_engine *, lmc_stats *);
  lmc_status (*engine_tier_count)(int32_t *, lmc_engine *);
  lmc_status (*engine_get_tier_stats)(lmc_engine *, int32_t, lmc_tier_stats *);
  lmc_status (*engine_get_tier_nodes)(int64_t *, lmc_engine *, int32_t, char *, int64_t);
  lmc_status (*engine_flush)(lmc_engine *, int64_t);
  lmc_status (*engine_clear)(lmc_engine *);
  lmc_status (*engine_poll_events)(int64_t *, int64_t *, uint64_t *, lmc_engine *, lmc_kv_event *,
                                   uint32_t, int64_t, int32_t *, int64_t);
};

/* Not static: referenced from main, so every function must resolve when the test is linked. */
struct lmc_test_prototypes lmc_test_prototypes_table(void);
struct lmc_test_prototypes lmc_test_prototypes_table(void) {
  struct lmc_test_prototypes t;
  t.version_number = lmc_version_number;
  t.abi_version = lmc_abi_version;
  t.version_string = lmc_version_string;
  t.status_name = lmc_status_name;
  t.last_error_message = lmc_last_error_message;
  t.engine_create = lmc_engine_create;
  t.engine_destroy = lmc_engine_destroy;
  t.engine_get_config = lmc_engine_get_config;
  t.config_schema = lmc_config_schema;
  t.engine_register_layers = lmc_engine_register_layers;
  t.lookup = lmc_lookup;
  t.store = lmc_store;
  t.retrieve = lmc_retrieve;
  t.lookup_server_start = lmc_lookup_server_start;
  t.lookup_server_stop = lmc_lookup_server_stop;
  t.remote_lookup = lmc_remote_lookup;
  t.prefetch_start = lmc_prefetch_start;
  t.job_wait = lmc_job_wait;
  t.job_poll = lmc_job_poll;
  t.job_result = lmc_job_result;
  t.job_destroy = lmc_job_destroy;
  t.cuda_device_count = lmc_cuda_device_count;
  t.engine_get_stats = lmc_engine_get_stats;
  t.engine_tier_count = lmc_engine_tier_count;
  t.engine_get_tier_stats = lmc_engine_get_tier_stats;
  t.engine_get_tier_nodes = lmc_engine_get_tier_nodes;
  t.engine_flush = lmc_engine_flush;
  t.engine_clear = lmc_engine_clear;
  t.engine_poll_events = lmc_engine_poll_events;
  return t;
}

#define PRINT_OFFSET(type, field) \
  printf("offsetof(%s, %s) = %u\n", #type, #field, (unsigned)offsetof(type, field))

int main(void) {
  struct lmc_test_prototypes t = lmc_test_prototypes_table();
  int missing = 0;
  printf("sizeof(lmc_kv_layer_desc) = %u\n", (unsigned)sizeof(lmc_kv_layer_desc));
  PRINT_OFFSET(lmc_kv_layer_desc, device_kind);
  PRINT_OFFSET(lmc_kv_layer_desc, reserved);
  PRINT_OFFSET(lmc_kv_layer_desc, base_address);
  PRINT_OFFSET(lmc_kv_layer_desc, span_bytes);
  PRINT_OFFSET(lmc_kv_layer_desc, kv_stride);
  PRINT_OFFSET(lmc_kv_layer_desc, head_stride);
  printf("sizeof(lmc_stats) = %u\n", (unsigned)sizeof(lmc_stats));
  PRINT_OFFSET(lmc_stats, lookup_requests);
  PRINT_OFFSET(lmc_stats, pool_capacity_bytes);
  printf("sizeof(lmc_tier_stats) = %u\n", (unsigned)sizeof(lmc_tier_stats));
  printf("sizeof(lmc_request) = %u\n", (unsigned)sizeof(lmc_request));
  PRINT_OFFSET(lmc_request, tokens);
  PRINT_OFFSET(lmc_request, first_token);
  PRINT_OFFSET(lmc_request, slot_mapping);
  PRINT_OFFSET(lmc_request, block_ids);
  PRINT_OFFSET(lmc_request, num_block_ids);
  PRINT_OFFSET(lmc_request, table_block_size);
  PRINT_OFFSET(lmc_request, stream);
  printf("sizeof(lmc_transfer_result) = %u\n", (unsigned)sizeof(lmc_transfer_result));
  PRINT_OFFSET(lmc_transfer_result, chunks_by_tier);
  PRINT_OFFSET(lmc_transfer_result, elapsed_ns);
  printf("sizeof(lmc_lookup_result) = %u\n", (unsigned)sizeof(lmc_lookup_result));
  PRINT_OFFSET(lmc_lookup_result, tokens_by_tier);
  PRINT_OFFSET(lmc_lookup_result, elapsed_ns);
  /* Touch the table so the linker must resolve every function. */
  if (t.version_number == NULL || t.engine_clear == NULL || t.job_poll == NULL ||
      t.job_result == NULL || t.config_schema == NULL || t.store == NULL || t.retrieve == NULL)
    missing++;
  return missing != 0;
}
