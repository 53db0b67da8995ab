/*
 * test_transfer.c — synchronous lmc_lookup / lmc_store / lmc_retrieve: the round trip with slot
 * mappings and with block tables (the same KV, the same guards), first_token semantics, -1 slots
 * and -1 block ids, partial chunks, exact results, every argument check (nothing written, nothing
 * cached, nothing counted), stats, clear, save_unfull_chunk and LRU eviction.
 */
#include "harness.h"

#define TB ((int64_t)TOKEN_BYTES)

static void expect_tiers(const lmc_transfer_result *r, int64_t t0, const char *what) {
  report(r->chunks_by_tier[0] == t0 && r->chunks_by_tier[1] == 0 && r->chunks_by_tier[2] == 0 &&
             r->chunks_by_tier[3] == 0,
         "%s: chunks_by_tier [%lld %lld %lld %lld] (want [%lld 0 0 0])", what,
         (long long)r->chunks_by_tier[0], (long long)r->chunks_by_tier[1],
         (long long)r->chunks_by_tier[2], (long long)r->chunks_by_tier[3], (long long)t0);
}

/* A store that must fail with `want` (and name `needle`): result untouched, nothing cached. */
static void store_fails(lmc_engine *e, const lmc_request *q, lmc_status want, const char *needle,
                        const char *what) {
  lmc_transfer_result r = tr_blank();
  lmc_status s = lmc_store(&r, e, q, NULL);
  if (expectf(s, want, needle, "store with %s", what) && !tr_is_blank(&r))
    report(0, "store with %s wrote its result %s", what, tr_str(&r));
}

static void retrieve_fails(lmc_engine *e, const lmc_request *q, lmc_status want,
                           const char *needle, const char *what) {
  lmc_transfer_result r = tr_blank();
  lmc_status s = lmc_retrieve(&r, e, q, NULL);
  if (expectf(s, want, needle, "retrieve with %s", what) && !tr_is_blank(&r))
    report(0, "retrieve with %s wrote its result %s", what, tr_str(&r));
}

static void lookup_fails(lmc_engine *e, const lmc_request *q, lmc_status want, const char *needle,
                         const char *what) {
  lmc_lookup_result r = lr_blank();
  lmc_status s = lmc_lookup(&r, e, q);
  if (expectf(s, want, needle, "lookup with %s", what) && !lr_is_blank(&r))
    report(0, "lookup with %s wrote its result %s", what, lr_str(&r));
}

/* ---------------------------------------------------------------------------------------------- */
/* The round trip with slot mappings, and the argument checks                                       */
/* ---------------------------------------------------------------------------------------------- */

static void test_round_trip(void) {
  lmc_engine *e = create_engine("{\"chunk_size\": 8, \"max_local_cpu_size\": 0.01}", "round trip");
  kvbuf src, dst, snap;
  int32_t tokA[NTOK + 8], tokB[NTOK], tokC[NTOK], tokD[NTOK], tokE[NTOK], tmp[NTOK];
  int64_t slots_src[NTOK + 8], slots_dst[NTOK + 8], slots_bad[NTOK + 8];
  lmc_transfer_result r;
  lmc_request q;
  lmc_stats st0, st1;
  lmc_status s;
  if (!e) return;
  kv_alloc(&src);
  kv_alloc(&dst);
  kv_alloc(&snap);
  kv_pattern(&src, 42);
  make_tokens(tokA, NTOK + 8, 1);
  make_tokens(tokB, NTOK, 2);
  make_tokens(tokC, NTOK, 3);
  make_tokens(tokD, NTOK, 4);
  make_tokens(tokE, NTOK, 5);
  make_slots(slots_src, NTOK + 8, 5, 3);
  make_slots(slots_dst, NTOK + 8, 7, 1);

  s = kv_register(e, &src, 2);
  EXPECT(s, LMC_OK, "register_layers: 2 NHD host layers [2, %d, %d, %d, %d] fp16", NB, BS, NH, HD);
  if (s != LMC_OK) goto done;

  expect_lookup(e, tokA, NTOK, NULL, 0, "A before any store");
  get_stats(e, &st0);
  r = expect_store(e, tokA, slots_src, NTOK, 0, NULL, NTOK, "A");
  check_tr(&r, NTOK, NTOK, 0, TB, "store A (nothing cached before)");
  report(r.chunks_skipped_for_space == 0, "store A: chunks_skipped_for_space %lld (want 0)",
         (long long)r.chunks_skipped_for_space);
  get_stats(e, &st1);
  report(d64(st1.store_requests, st0.store_requests) == 1 &&
             d64(st1.stored_tokens, st0.stored_tokens) == NTOK &&
             d64(st1.stored_bytes, st0.stored_bytes) == NTOK * TOKEN_BYTES &&
             st1.cached_chunks == NTOK / CHUNK,
         "stats after store A: store_requests +%llu (1), stored_tokens +%llu (%d), stored_bytes "
         "+%llu (%llu), cached_chunks %llu (%d)",
         (unsigned long long)d64(st1.store_requests, st0.store_requests),
         (unsigned long long)d64(st1.stored_tokens, st0.stored_tokens), NTOK,
         (unsigned long long)d64(st1.stored_bytes, st0.stored_bytes),
         (unsigned long long)(NTOK * TOKEN_BYTES), (unsigned long long)st1.cached_chunks,
         NTOK / CHUNK);
  report(st1.pool_used_bytes >= (NTOK / CHUNK) * CHUNK_BYTES && st1.pool_capacity_bytes > 0 &&
             st1.pool_capacity_bytes % CHUNK_BYTES == 0 &&
             st1.pool_capacity_bytes <= 10737418ull,
         "pool gauges: used %llu (>= %llu), capacity %llu (whole %llu-byte chunks, <= 0.01 GB)",
         (unsigned long long)st1.pool_used_bytes,
         (unsigned long long)((NTOK / CHUNK) * CHUNK_BYTES),
         (unsigned long long)st1.pool_capacity_bytes, (unsigned long long)CHUNK_BYTES);

  expect_lookup(e, tokA, NTOK, NULL, NTOK, "A");
  expect_lookup(e, tokA, 20, NULL, 16, "A, first 20 tokens");
  expect_lookup(e, tokA, 7, NULL, 0, "A, first 7 tokens");
  expect_lookup(e, tokA, NTOK + 8, NULL, NTOK, "A plus 8 more tokens");
  expect_lookup(e, NULL, 0, NULL, 0, "of nothing (tokens NULL)");
  expect_lookup(e, tokA, NTOK, "salt", 0, "A with an extra key it was not stored with");
  memcpy(tmp, tokA, sizeof tmp);
  tmp[0] ^= 1;
  expect_lookup(e, tmp, NTOK, NULL, 0, "A with token 0 changed");
  memcpy(tmp, tokA, sizeof tmp);
  tmp[9] ^= 1;
  expect_lookup(e, tmp, NTOK, NULL, 8, "A with token 9 changed");
  {
    lmc_lookup_result lr = lr_blank();
    q = req_tokens(tokA, NTOK, NULL);
    s = lmc_lookup(&lr, e, &q);
    report(s == LMC_OK && lr.hit_tokens == NTOK && lr.tokens_by_tier[0] == NTOK &&
               lr.tokens_by_tier[1] == 0 && lr.tokens_by_tier[2] == 0 &&
               lr.tokens_by_tier[3] == 0 && lr.elapsed_ns >= 0 && lr.struct_size == sizeof lr,
           "lookup A: %s, result %s (want hit %d, all in the CPU tier)", sname(s), lr_str(&lr),
           NTOK);
    /* The destination is ignored by lookups: slots that would fail a store do not matter. */
    memcpy(slots_bad, slots_src, sizeof slots_bad);
    slots_bad[2] = -5;
    slots_bad[3] = NSLOTS;
    q = req_slots(tokA, NTOK, slots_bad, 0, NULL);
    lr = lr_blank();
    s = lmc_lookup(&lr, e, &q);
    EXPECT(s, LMC_OK, "lookup with a slot mapping holding -5 and %d (the destination is ignored)",
           NSLOTS);
    report(lr.hit_tokens == NTOK, "lookup ignoring the destination hits %lld (want %d)",
           (long long)lr.hit_tokens, NTOK);
    q = req_table(tokA, NTOK, NULL, 0, 0, 0, NULL);
    lr = lr_blank();
    s = lmc_lookup(&lr, e, &q);
    EXPECT(s, LMC_OK, "lookup with an empty block table (block_ids NULL, table_block_size 0)");
    report(lr.hit_tokens == NTOK, "lookup with an empty block table hits %lld (want %d)",
           (long long)lr.hit_tokens, NTOK);
  }

  get_stats(e, &st0);
  r = expect_store(e, tokA, slots_src, NTOK, 0, NULL, NTOK, "A again (already cached)");
  check_tr(&r, NTOK, 0, NTOK / CHUNK, TB, "store A again: nothing copied, 3 chunks already cached");
  get_stats(e, &st1);
  report(d64(st1.stored_tokens, st0.stored_tokens) == 0 && st1.cached_chunks == st0.cached_chunks,
         "storing A again copies nothing (stored_tokens +%llu, cached_chunks %llu)",
         (unsigned long long)d64(st1.stored_tokens, st0.stored_tokens),
         (unsigned long long)st1.cached_chunks);

  /* Retrieve into a second set of buffers with other slots. Same shapes: same namespace, so
   * re-registering keeps the cache. */
  kv_fill(&dst, GUARD_VALUE);
  s = kv_register(e, &dst, 2);
  EXPECT(s, LMC_OK, "register_layers: second buffer set, same shapes");
  expect_lookup(e, tokA, NTOK, NULL, NTOK, "A after re-registering the same shapes");

  get_stats(e, &st0);
  q = req_slots(tokA, NTOK, slots_dst, 0, NULL);
  r = retrieve_and_verify(e, &dst, &src, &q, slots_src, NTOK, NTOK, "A");
  expect_tiers(&r, NTOK / CHUNK, "retrieve A");
  get_stats(e, &st1);
  report(d64(st1.retrieve_requests, st0.retrieve_requests) == 1 &&
             d64(st1.retrieved_tokens, st0.retrieved_tokens) == NTOK &&
             d64(st1.retrieved_bytes, st0.retrieved_bytes) == NTOK * TOKEN_BYTES,
         "stats after retrieve A: retrieve_requests +%llu (1), retrieved_tokens +%llu (%d), "
         "retrieved_bytes +%llu (%llu)",
         (unsigned long long)d64(st1.retrieve_requests, st0.retrieve_requests),
         (unsigned long long)d64(st1.retrieved_tokens, st0.retrieved_tokens), NTOK,
         (unsigned long long)d64(st1.retrieved_bytes, st0.retrieved_bytes),
         (unsigned long long)(NTOK * TOKEN_BYTES));

  q = req_slots(tokA, 20, slots_dst, 0, NULL);
  r = retrieve_and_verify(e, &dst, &src, &q, slots_src, 16, 16, "A, first 20 tokens");
  expect_tiers(&r, 2, "retrieve A, first 20 tokens");
  q = req_slots(tokA, NTOK + 8, slots_dst, 0, NULL);
  retrieve_and_verify(e, &dst, &src, &q, slots_src, NTOK, NTOK, "A plus 8 uncached tokens");
  q = req_slots(tokA, NTOK, slots_dst, 8, NULL);
  retrieve_and_verify(e, &dst, &src, &q, slots_src, NTOK, NTOK - 8,
                      "A from token 8 (engine owns the first 8)");
  q = req_slots(tokA, NTOK, slots_dst, 5, NULL);
  retrieve_and_verify(e, &dst, &src, &q, slots_src, NTOK, NTOK - 5,
                      "A from token 5 (first_token inside a chunk)");
  memcpy(slots_bad, slots_dst, sizeof slots_bad);
  slots_bad[10] = -1;
  slots_bad[17] = -1;
  q = req_slots(tokA, NTOK, slots_bad, 8, NULL);
  retrieve_and_verify(e, &dst, &src, &q, slots_src, NTOK, NTOK - 8 - 2,
                      "A with slots 10 and 17 = -1");
  q = req_slots(tokA, NTOK, slots_dst, NTOK, NULL);
  retrieve_and_verify(e, &dst, &src, &q, slots_src, NTOK, 0,
                      "A, first_token = num_tokens (writes nothing)");
  q = req_slots(tokB, NTOK, slots_dst, 0, NULL);
  r = retrieve_and_verify(e, &dst, &src, &q, slots_src, 0, 0, "B (a miss)");
  expect_tiers(&r, 0, "retrieve B (a miss)");
  q = req_slots(NULL, 0, NULL, 0, NULL);
  retrieve_and_verify(e, &dst, &src, &q, slots_src, 0, 0, "of nothing (NULL, 0)");

  /* Retrieve with bad arguments: nothing written, result untouched, nothing counted. */
  kv_pattern(&dst, 7);
  kv_copy(&snap, &dst);
  get_stats(e, &st0);
  memcpy(slots_bad, slots_dst, sizeof slots_bad);
  slots_bad[5] = NSLOTS;
  q = req_slots(tokA, NTOK, slots_bad, 0, NULL);
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, NULL, "slot 32 = num_blocks*block_size at token 5");
  expect_untouched(&dst, &snap, "retrieve with a slot past the cache");
  memcpy(slots_bad, slots_dst, sizeof slots_bad);
  slots_bad[NTOK + 3] = 1000000; /* past the cached prefix: must still fail before copying */
  q = req_slots(tokA, NTOK + 8, slots_bad, 0, NULL);
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, NULL, "slot 1000000 at token 27 (past the hit)");
  expect_untouched(&dst, &snap, "retrieve with a slot past the cache after the hit");
  memcpy(slots_bad, slots_dst, sizeof slots_bad);
  slots_bad[3] = -2;
  q = req_slots(tokA, NTOK, slots_bad, 0, NULL);
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, NULL, "slot -2 at token 3");
  slots_bad[3] = INT64_MIN;
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, NULL, "slot INT64_MIN at token 3");
  q = req_slots(tokA, -1, slots_dst, 0, NULL);
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, NULL, "num_tokens -1");
  q = req_slots(NULL, NTOK, slots_dst, 0, NULL);
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "tokens", "tokens NULL, num_tokens 24");
  q = req_slots(tokA, NTOK, NULL, 0, NULL);
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "slot_mapping", "slot_mapping NULL, num_tokens 24");
  q = req_slots(tokA, NTOK, slots_dst, -1, NULL);
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "first_token", "first_token -1");
  q = req_slots(tokA, NTOK, slots_dst, NTOK + 1, NULL);
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "first_token", "first_token num_tokens+1");
  q = req_slots(tokA, NTOK, slots_dst, 0, NULL);
  q.extra_key_len = 4;
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "extra_key", "extra_key NULL, extra_key_len 4");
  q = req_slots(tokA, NTOK, slots_dst, 0, "salt");
  q.extra_key_len = -1;
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "extra_key", "extra_key_len -1");
  {
    int64_t big = ((int64_t)1 << 20) + 1;
    uint8_t *key = (uint8_t *)calloc((size_t)big, 1);
    q = req_slots(tokA, NTOK, slots_dst, 0, NULL);
    q.extra_key = key;
    q.extra_key_len = big;
    retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "extra_key", "extra_key of 1 MiB + 1 bytes");
    q.extra_key_len = big - 1;
    r = tr_blank();
    s = lmc_retrieve(&r, e, &q, NULL);
    EXPECT(s, LMC_OK, "retrieve with an extra key of exactly 1 MiB (a miss)");
    report(r.tokens_matched == 0, "retrieve with a 1 MiB extra key matched %lld (want 0)",
           (long long)r.tokens_matched);
    free(key);
    kv_copy(&dst, &snap);
  }
  q = req_slots(tokA, NTOK, slots_dst, 0, NULL);
  q.destination_kind = 2;
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "destination_kind", "destination_kind 2");
  q.destination_kind = -1;
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "destination_kind", "destination_kind -1");
  q = req_slots(tokA, NTOK, slots_dst, 0, NULL);
  q.reserved = 1;
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "reserved", "request reserved 1");
  q = req_slots(tokA, NTOK, slots_dst, 0, NULL);
  q.struct_size = 0;
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "struct_size", "request struct_size 0");
  q.struct_size = 8;
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "struct_size", "request struct_size 8 (header only)");
  q.struct_size = 40;
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "struct_size",
                 "request struct_size 40 (cut before first_token)");
  q = req_slots(tokA, NTOK, slots_dst, 0, NULL);
  retrieve_fails(e, NULL, LMC_E_INVALID_ARGUMENT, "request", "request NULL");
  EXPECT_MSG(lmc_retrieve(NULL, e, &q, NULL), LMC_E_INVALID_ARGUMENT, "result_out",
             "retrieve with result_out NULL and job_out NULL (synchronous)");
  {
    lmc_transfer_result small = tr_blank();
    small.struct_size = 0;
    s = lmc_retrieve(&small, e, &q, NULL);
    EXPECT_MSG(s, LMC_E_INVALID_ARGUMENT, "struct_size", "retrieve with result struct_size 0");
    small = tr_blank();
    small.struct_size = 4;
    s = lmc_retrieve(&small, e, &q, NULL);
    EXPECT_MSG(s, LMC_E_INVALID_ARGUMENT, "struct_size", "retrieve with result struct_size 4");
    small.struct_size = (uint32_t)sizeof small;
    report(tr_is_blank(&small), "results with a too small struct_size are left untouched");
  }
  expect_untouched(&dst, &snap, "all failed retrieves");
  retrieve_fails(NULL, &q, LMC_E_INVALID_HANDLE, NULL, "engine NULL");
  get_stats(e, &st1);
  report(st1.retrieve_requests == st0.retrieve_requests + 1,
         "failed retrieves are not counted (retrieve_requests +%llu, want 1: the 1 MiB key miss)",
         (unsigned long long)d64(st1.retrieve_requests, st0.retrieve_requests));

  /* A result struct of an older caller: the library writes no byte past struct_size. */
  {
    lmc_transfer_result part = tr_blank();
    unsigned char *p = (unsigned char *)&part;
    size_t k;
    int untouched = 1;
    part.struct_size = 16;
    s = lmc_retrieve(&part, e, &q, NULL);
    capture_message();
    for (k = 16; k < sizeof part; k++)
      if (p[k] != 0xAB) untouched = 0;
    report((s == LMC_OK || s == LMC_E_INVALID_ARGUMENT) && untouched &&
               (s != LMC_OK || part.tokens_matched == NTOK),
           "retrieve with result struct_size 16 -> %s, nothing written past byte 16%s%s", sname(s),
           untouched ? "" : " [bytes past 16 were written]", s == LMC_OK ? "" : g_msg);
    kv_copy(&dst, &snap);
  }

  {
    /* A lookup result of an older caller: nothing written past struct_size. */
    lmc_lookup_result part = lr_blank();
    unsigned char *p = (unsigned char *)&part;
    size_t k;
    int untouched = 1;
    q = req_tokens(tokA, NTOK, NULL);
    part.struct_size = 16;
    s = lmc_lookup(&part, e, &q);
    capture_message();
    for (k = 16; k < sizeof part; k++)
      if (p[k] != 0xAB) untouched = 0;
    report((s == LMC_OK || s == LMC_E_INVALID_ARGUMENT) && untouched &&
               (s != LMC_OK || part.hit_tokens == NTOK),
           "lookup with result struct_size 16 -> %s, nothing written past byte 16%s%s", sname(s),
           untouched ? "" : " [bytes past 16 were written]", s == LMC_OK ? "" : g_msg);
  }
  /* Lookup with bad arguments. */
  get_stats(e, &st0);
  q = req_tokens(tokA, NTOK, NULL);
  EXPECT_MSG(lmc_lookup(NULL, e, &q), LMC_E_INVALID_ARGUMENT, "result_out",
             "lookup with result_out NULL");
  lookup_fails(NULL, &q, LMC_E_INVALID_HANDLE, NULL, "engine NULL");
  lookup_fails(e, NULL, LMC_E_INVALID_ARGUMENT, "request", "request NULL");
  q = req_tokens(NULL, NTOK, NULL);
  lookup_fails(e, &q, LMC_E_INVALID_ARGUMENT, "tokens", "tokens NULL, num_tokens 24");
  q = req_tokens(tokA, -1, NULL);
  lookup_fails(e, &q, LMC_E_INVALID_ARGUMENT, NULL, "num_tokens -1");
  q = req_tokens(tokA, NTOK, NULL);
  q.extra_key_len = 3;
  lookup_fails(e, &q, LMC_E_INVALID_ARGUMENT, "extra_key", "extra_key NULL, extra_key_len 3");
  q = req_tokens(tokA, NTOK, "salt");
  q.extra_key_len = -1;
  lookup_fails(e, &q, LMC_E_INVALID_ARGUMENT, "extra_key", "extra_key_len -1");
  q = req_tokens(tokA, NTOK, NULL);
  q.first_token = 8;
  lookup_fails(e, &q, LMC_E_INVALID_ARGUMENT, "first_token", "first_token 8 (must be 0)");
  q = req_tokens(tokA, NTOK, NULL);
  q.struct_size = 0;
  lookup_fails(e, &q, LMC_E_INVALID_ARGUMENT, "struct_size", "request struct_size 0");
  q = req_tokens(tokA, NTOK, NULL);
  q.reserved = 7;
  lookup_fails(e, &q, LMC_E_INVALID_ARGUMENT, "reserved", "request reserved 7");
  {
    lmc_lookup_result small = lr_blank();
    q = req_tokens(tokA, NTOK, NULL);
    small.struct_size = 0;
    EXPECT_MSG(lmc_lookup(&small, e, &q), LMC_E_INVALID_ARGUMENT, "struct_size",
               "lookup with result struct_size 0");
    small.struct_size = 4;
    EXPECT_MSG(lmc_lookup(&small, e, &q), LMC_E_INVALID_ARGUMENT, "struct_size",
               "lookup with result struct_size 4");
  }
  get_stats(e, &st1);
  report(st0.lookup_requests == st1.lookup_requests,
         "failed lookups are not counted (lookup_requests +%llu)",
         (unsigned long long)d64(st1.lookup_requests, st0.lookup_requests));
  expect_lookup(e, tokA, NTOK, NULL, NTOK, "A (counted)");
  get_stats(e, &st0);
  report(d64(st0.lookup_requests, st1.lookup_requests) == 1 &&
             d64(st0.lookup_tokens, st1.lookup_tokens) == NTOK &&
             d64(st0.lookup_hit_tokens, st1.lookup_hit_tokens) == NTOK,
         "stats after one lookup: lookup_requests +%llu (1), lookup_tokens +%llu (%d), "
         "lookup_hit_tokens +%llu (%d)",
         (unsigned long long)d64(st0.lookup_requests, st1.lookup_requests),
         (unsigned long long)d64(st0.lookup_tokens, st1.lookup_tokens), NTOK,
         (unsigned long long)d64(st0.lookup_hit_tokens, st1.lookup_hit_tokens), NTOK);

  /* Store with bad arguments: nothing cached, nothing counted. */
  s = kv_register(e, &src, 2);
  EXPECT(s, LMC_OK, "register_layers: back to the source buffers");
  get_stats(e, &st0);
  memcpy(slots_bad, slots_src, sizeof slots_bad);
  slots_bad[20] = NSLOTS;
  q = req_slots(tokB, NTOK, slots_bad, 0, NULL);
  store_fails(e, &q, LMC_E_INVALID_ARGUMENT, NULL, "slot 32 at token 20");
  slots_bad[20] = -5;
  store_fails(e, &q, LMC_E_INVALID_ARGUMENT, NULL, "slot -5 at token 20");
  q = req_slots(tokB, -1, slots_src, 0, NULL);
  store_fails(e, &q, LMC_E_INVALID_ARGUMENT, NULL, "num_tokens -1");
  q = req_slots(NULL, NTOK, slots_src, 0, NULL);
  store_fails(e, &q, LMC_E_INVALID_ARGUMENT, "tokens", "tokens NULL, num_tokens 24");
  q = req_slots(tokB, NTOK, NULL, 0, NULL);
  store_fails(e, &q, LMC_E_INVALID_ARGUMENT, "slot_mapping", "slot_mapping NULL, num_tokens 24");
  q = req_slots(tokB, NTOK, slots_src, 0, NULL);
  q.extra_key_len = 4;
  store_fails(e, &q, LMC_E_INVALID_ARGUMENT, "extra_key", "extra_key NULL, extra_key_len 4");
  q = req_slots(tokB, NTOK, slots_src, 0, "salt");
  q.extra_key_len = -1;
  store_fails(e, &q, LMC_E_INVALID_ARGUMENT, "extra_key", "extra_key_len -1");
  q = req_slots(tokB, NTOK, slots_src, -1, NULL);
  store_fails(e, &q, LMC_E_INVALID_ARGUMENT, "first_token", "first_token (skip) -1");
  q = req_slots(tokB, NTOK, slots_src, NTOK + 1, NULL);
  store_fails(e, &q, LMC_E_INVALID_ARGUMENT, "first_token", "first_token (skip) num_tokens+1");
  q = req_slots(tokB, NTOK, slots_src, 0, NULL);
  q.destination_kind = 5;
  store_fails(e, &q, LMC_E_INVALID_ARGUMENT, "destination_kind", "destination_kind 5");
  q = req_slots(tokB, NTOK, slots_src, 0, NULL);
  q.struct_size = 0;
  store_fails(e, &q, LMC_E_INVALID_ARGUMENT, "struct_size", "request struct_size 0");
  q = req_slots(tokB, NTOK, slots_src, 0, NULL);
  q.reserved = -1;
  store_fails(e, &q, LMC_E_INVALID_ARGUMENT, "reserved", "request reserved -1");
  store_fails(e, NULL, LMC_E_INVALID_ARGUMENT, "request", "request NULL");
  q = req_slots(tokB, NTOK, slots_src, 0, NULL);
  EXPECT_MSG(lmc_store(NULL, e, &q, NULL), LMC_E_INVALID_ARGUMENT, "result_out",
             "store with result_out NULL and job_out NULL (synchronous)");
  {
    lmc_transfer_result small = tr_blank();
    small.struct_size = 0;
    EXPECT_MSG(lmc_store(&small, e, &q, NULL), LMC_E_INVALID_ARGUMENT, "struct_size",
               "store with result struct_size 0");
    small.struct_size = 4;
    EXPECT_MSG(lmc_store(&small, e, &q, NULL), LMC_E_INVALID_ARGUMENT, "struct_size",
               "store with result struct_size 4");
  }
  store_fails(NULL, &q, LMC_E_INVALID_HANDLE, NULL, "engine NULL");
  get_stats(e, &st1);
  report(st1.store_requests == st0.store_requests && st1.cached_chunks == st0.cached_chunks &&
             st1.stored_tokens == st0.stored_tokens,
         "failed stores cache and count nothing (store_requests +%llu, cached_chunks %llu -> %llu)",
         (unsigned long long)d64(st1.store_requests, st0.store_requests),
         (unsigned long long)st0.cached_chunks, (unsigned long long)st1.cached_chunks);
  expect_lookup(e, tokB, NTOK, NULL, 0, "B after the failed stores");

  /* Store semantics. */
  memcpy(slots_bad, slots_src, sizeof slots_bad);
  slots_bad[12] = -1;
  r = expect_store(e, tokB, slots_bad, NTOK, 0, NULL, 8, "B with slot -1 at token 12");
  check_tr(&r, 8, 8, 0, TB, "store B with slot -1 at token 12 (stops before chunk 1)");
  expect_lookup(e, tokB, NTOK, NULL, 8, "B (only its first chunk)");

  r = expect_store(e, tokC, slots_src, NTOK, 8, NULL, 16, "C skipping 8 tokens");
  check_tr(&r, 16, 16, 0, TB, "store C skipping 8 tokens");
  expect_lookup(e, tokC, NTOK, NULL, 0, "C (first chunk missing)");
  get_stats(e, &st0);
  r = expect_store(e, tokC, slots_src, NTOK, 0, NULL, NTOK, "C in full");
  check_tr(&r, NTOK, 8, 2, TB, "store C in full (copies chunk 0; chunks 1, 2 already cached)");
  get_stats(e, &st1);
  report(d64(st1.stored_tokens, st0.stored_tokens) == 8,
         "storing C in full copies only the missing chunk (stored_tokens +%llu, want 8)",
         (unsigned long long)d64(st1.stored_tokens, st0.stored_tokens));
  expect_lookup(e, tokC, NTOK, NULL, NTOK, "C");

  r = expect_store(e, tokD, slots_src, NTOK, 12, NULL, 16, "D skipping 12 (rounds down to 8)");
  check_tr(&r, 16, 16, 0, TB, "store D skipping 12");
  r = expect_store(e, tokE, slots_src, 20, 0, NULL, 16, "E, 20 tokens (partial chunk dropped)");
  check_tr(&r, 16, 16, 0, TB, "store E, 20 tokens");
  expect_lookup(e, tokE, 20, NULL, 16, "E, 20 tokens");
  r = expect_store(e, tokE, slots_src, 0, 0, NULL, 0, "of nothing (0 tokens)");
  check_tr(&r, 0, 0, 0, TB, "store of nothing");
  r = expect_store(e, tokE, slots_src, 20, 20, NULL, 0,
                   "E, 20 tokens, skip = num_tokens (rounds down to 16: only a partial chunk left)");
  check_tr(&r, 0, 0, 0, TB, "store E skipping all 20 tokens");

  get_stats(e, &st0);
  expect_store(e, tokA, slots_src, NTOK, 0, "salt", NTOK, "A with extra key \"salt\"");
  get_stats(e, &st1);
  report(d64(st1.stored_tokens, st0.stored_tokens) == NTOK,
         "A with an extra key is a different entry (stored_tokens +%llu, want %d)",
         (unsigned long long)d64(st1.stored_tokens, st0.stored_tokens), NTOK);
  expect_lookup(e, tokA, NTOK, "salt", NTOK, "A with extra key \"salt\"");
  expect_lookup(e, tokA, NTOK, "salu", 0, "A with extra key \"salu\"");
  expect_lookup(e, tokA, NTOK, "sal", 0, "A with extra key \"sal\"");
  expect_lookup(e, tokA, NTOK, NULL, NTOK, "A without extra key");

  /* A failed registration keeps both the layers and the cache. */
  {
    lmc_kv_layer_desc bad[2];
    bad[0] = nhd_desc(kv_base(&dst, 0));
    bad[1] = nhd_desc(kv_base(&dst, 1));
    bad[1].head_stride = 1;
    s = lmc_engine_register_layers(e, bad, 2);
    EXPECT(s, LMC_E_INVALID_ARGUMENT, "register_layers with a bad layer 1 on a live engine");
    expect_lookup(e, tokA, NTOK, NULL, NTOK, "A after the failed registration");
    kv_fill(&dst, GUARD_VALUE);
    kv_copy(&snap, &dst);
    r = tr_blank();
    q = req_slots(tokA, NTOK, slots_dst, 0, NULL);
    s = lmc_retrieve(&r, e, &q, NULL);
    EXPECT(s, LMC_OK, "retrieve after the failed registration");
    expect_untouched(&dst, &snap,
                     "retrieve after a failed registration to dst (layers are still src)");
    report(r.tokens_matched == NTOK, "retrieve after the failed registration matched %lld (want %d)",
           (long long)r.tokens_matched, NTOK);
  }

  /* get_stats struct_size protocol. */
  {
    lmc_stats big;
    unsigned char *p = (unsigned char *)&big;
    size_t k;
    int untouched;
    s = lmc_engine_get_stats(e, NULL);
    EXPECT(s, LMC_E_INVALID_ARGUMENT, "get_stats with stats NULL");
    memset(&big, 0xAB, sizeof big);
    big.struct_size = (uint32_t)sizeof big;
    s = lmc_engine_get_stats(NULL, &big);
    EXPECT(s, LMC_E_INVALID_HANDLE, "get_stats with engine NULL");
    big.struct_size = 0;
    s = lmc_engine_get_stats(e, &big);
    EXPECT(s, LMC_E_INVALID_ARGUMENT, "get_stats with struct_size 0");
    big.struct_size = 4;
    s = lmc_engine_get_stats(e, &big);
    EXPECT(s, LMC_E_INVALID_ARGUMENT, "get_stats with struct_size 4 (< 8)");
    big.struct_size = 7;
    s = lmc_engine_get_stats(e, &big);
    EXPECT(s, LMC_E_INVALID_ARGUMENT, "get_stats with struct_size 7 (< 8)");
    for (untouched = 1, k = 4; k < sizeof big; k++)
      if (p[k] != 0xAB) untouched = 0;
    report(untouched, "failed get_stats calls leave the struct untouched");

    big.struct_size = 8;
    s = lmc_engine_get_stats(e, &big);
    EXPECT(s, LMC_OK, "get_stats with struct_size 8");
    for (untouched = 1, k = 8; k < sizeof big; k++)
      if (p[k] != 0xAB) untouched = 0;
    report(untouched, "get_stats with struct_size 8 writes nothing past byte 8");

    memset(&big, 0xAB, sizeof big);
    big.struct_size = 24;
    s = lmc_engine_get_stats(e, &big);
    EXPECT(s, LMC_OK, "get_stats with struct_size 24 (old caller, 2 counters)");
    for (untouched = 1, k = 24; k < sizeof big; k++)
      if (p[k] != 0xAB) untouched = 0;
    get_stats(e, &st0);
    report(untouched && big.lookup_requests == st0.lookup_requests &&
               big.lookup_tokens == st0.lookup_tokens,
           "get_stats with struct_size 24 fills lookup_requests %llu / lookup_tokens %llu only",
           (unsigned long long)big.lookup_requests, (unsigned long long)big.lookup_tokens);
  }

  /* clear: cache emptied, counters kept. */
  get_stats(e, &st0);
  s = lmc_engine_clear(NULL);
  EXPECT(s, LMC_E_INVALID_HANDLE, "lmc_engine_clear(NULL)");
  s = lmc_engine_clear(e);
  EXPECT(s, LMC_OK, "lmc_engine_clear");
  get_stats(e, &st1);
  report(st1.cached_chunks == 0 && st1.pool_used_bytes == 0 &&
             st1.store_requests == st0.store_requests && st1.stored_tokens == st0.stored_tokens &&
             st1.pool_capacity_bytes == st0.pool_capacity_bytes,
         "after clear: cached_chunks %llu, pool_used_bytes %llu, counters kept (store_requests "
         "%llu -> %llu)",
         (unsigned long long)st1.cached_chunks, (unsigned long long)st1.pool_used_bytes,
         (unsigned long long)st0.store_requests, (unsigned long long)st1.store_requests);
  expect_lookup(e, tokA, NTOK, NULL, 0, "A after clear");
  s = lmc_engine_clear(e);
  EXPECT(s, LMC_OK, "lmc_engine_clear on an empty cache");

  /* A store after clear works; a namespace change (layer count) clears the cache. */
  r = expect_store(e, tokA, slots_src, NTOK, 0, NULL, NTOK, "A after clear");
  check_tr(&r, NTOK, NTOK, 0, TB, "store A after clear copies everything again");
  s = kv_register(e, &src, 1);
  EXPECT(s, LMC_OK, "register_layers with 1 layer (namespace changes)");
  expect_lookup(e, tokA, NTOK, NULL, 0, "A after the namespace changed");
  r = expect_store(e, tokB, slots_src, NTOK, 0, NULL, NTOK, "B with 1 layer");
  check_tr(&r, NTOK, NTOK, 0, TB / MAXL, "store B with 1 layer (bytes per token halved)");
  s = kv_register(e, &src, 2);
  EXPECT(s, LMC_OK, "register_layers with 2 layers again");
  expect_lookup(e, tokA, NTOK, NULL, 0, "A (the cache was cleared by the namespace change)");
  expect_lookup(e, tokB, NTOK, NULL, 0, "B (stored with 1 layer: another namespace)");
  get_stats(e, &st1);
  report(st1.cached_chunks == 0, "cached_chunks after the namespace change: %llu",
         (unsigned long long)st1.cached_chunks);

done:
  lmc_engine_destroy(e);
  kv_free(&src);
  kv_free(&dst);
  kv_free(&snap);
}

/* ---------------------------------------------------------------------------------------------- */
/* Block tables                                                                                     */
/* ---------------------------------------------------------------------------------------------- */

/* Retrieves the same tokens once with a block table and once with the slot mapping it expands to
 * (computed here), each into guard-filled memory, and compares: same KV, same guards, same result. */
static void table_vs_slots(lmc_engine *e, kvbuf *dst, const kvbuf *src, const int32_t *tok,
                           int64_t n, const int64_t *src_slots, const int32_t *blocks,
                           int64_t nblocks, int32_t tbs, int64_t first, int64_t want_matched,
                           int64_t want_copied, const char *what) {
  int64_t slots[64];
  kvbuf via_table;
  lmc_request qt, qs;
  lmc_transfer_result rt, rs;
  char label[200], where[256];
  int same;
  kv_alloc(&via_table);
  table_to_slots(blocks, nblocks, tbs, n, slots);
  qt = req_table(tok, n, blocks, nblocks, tbs, first, NULL);
  qs = req_slots(tok, n, slots, first, NULL);
  snprintf(label, sizeof label, "%s via block table", what);
  rt = retrieve_and_verify(e, dst, src, &qt, src_slots, want_matched, want_copied, label);
  kv_copy(&via_table, dst);
  snprintf(label, sizeof label, "%s via the equivalent slot mapping", what);
  rs = retrieve_and_verify(e, dst, src, &qs, src_slots, want_matched, want_copied, label);
  where[0] = '\0';
  same = kv_equal(dst, &via_table, where, sizeof where);
  report(same, "%s: block table and slot mapping write the same bytes, guards included%s%s", what,
         where[0] ? " -- first difference at " : "", where);
  report(tr_same_work(&rt, &rs), "%s: block table result %s == slot mapping result %s", what,
         tr_str(&rt), tr_str(&rs));
  kv_free(&via_table);
}

static void test_block_tables(void) {
  const char *config = "{\"chunk_size\": 8, \"max_local_cpu_size\": 0.01}";
  lmc_engine *e = create_engine(config, "block tables");
  lmc_engine *e2 = create_engine(config, "block tables, slot-mapping twin");
  kvbuf src, dst, snap;
  int32_t tokA[NTOK + 8], tokB[NTOK], tokC[NTOK], tokD[NTOK], tokF[NTOK];
  int64_t slots_src[NTOK + 8], slots_t[NTOK + 8];
  /* block_size 4 (the layers' own): 6 blocks for 24 tokens, in a scrambled order */
  int32_t b4[8] = {5, 2, 7, 0, 3, 6, 1, 4};
  int32_t b8[3] = {1, 3, 0};                                  /* table_block_size 8 */
  int32_t b2[12] = {15, 0, 9, 4, 11, 2, 13, 6, 1, 10, 3, 14}; /* table_block_size 2 */
  int32_t b16[2] = {1, 0};                                    /* table_block_size 16 */
  int32_t bad[8];
  lmc_transfer_result r, r2;
  lmc_request q;
  lmc_status s;
  if (!e || !e2) {
    lmc_engine_destroy(e);
    lmc_engine_destroy(e2);
    return;
  }
  kv_alloc(&src);
  kv_alloc(&dst);
  kv_alloc(&snap);
  kv_pattern(&src, 77);
  make_tokens(tokA, NTOK + 8, 31);
  make_tokens(tokB, NTOK, 32);
  make_tokens(tokC, NTOK, 33);
  make_tokens(tokD, NTOK, 34);
  make_tokens(tokF, NTOK, 35);
  make_slots(slots_src, NTOK + 8, 5, 3);
  EXPECT(kv_register(e, &src, 2), LMC_OK, "register_layers [block tables]");
  EXPECT(kv_register(e2, &src, 2), LMC_OK, "register_layers [block tables, twin]");
  expect_store(e, tokA, slots_src, NTOK, 0, NULL, NTOK, "A with a slot mapping [block tables]");

  /* Retrieve: block tables of every block size against their slot mappings. */
  EXPECT(kv_register(e, &dst, 2), LMC_OK, "register the destination [block tables]");
  table_vs_slots(e, &dst, &src, tokA, NTOK, slots_src, b4, 6, BS, 0, NTOK, NTOK,
                 "A, table_block_size 4 (6 blocks)");
  table_vs_slots(e, &dst, &src, tokA, NTOK, slots_src, b4, 8, BS, 0, NTOK, NTOK,
                 "A, table_block_size 4 (8 blocks: 2 more than the tokens need)");
  table_vs_slots(e, &dst, &src, tokA, NTOK, slots_src, b8, 3, 8, 0, NTOK, NTOK,
                 "A, table_block_size 8 (2 layer blocks per table block)");
  table_vs_slots(e, &dst, &src, tokA, NTOK, slots_src, b2, 12, 2, 0, NTOK, NTOK,
                 "A, table_block_size 2 (half a layer block)");
  table_vs_slots(e, &dst, &src, tokA, NTOK, slots_src, b16, 2, 16, 0, NTOK, NTOK,
                 "A, table_block_size 16 (24 tokens in 2 blocks, the last one partly used)");
  table_vs_slots(e, &dst, &src, tokA, NTOK, slots_src, b4, 6, BS, 8, NTOK, NTOK - 8,
                 "A, first_token 8");
  table_vs_slots(e, &dst, &src, tokA, NTOK, slots_src, b4, 6, BS, 6, NTOK, NTOK - 6,
                 "A, first_token 6 (inside a block and a chunk)");
  table_vs_slots(e, &dst, &src, tokA, 20, slots_src, b4, 5, BS, 0, 16, 16,
                 "A, 20 tokens (partial chunk not retrieved)");
  table_vs_slots(e, &dst, &src, tokA, NTOK + 8, slots_src, b4, 8, BS, 0, NTOK, NTOK,
                 "A plus 8 uncached tokens");
  memcpy(bad, b4, sizeof bad);
  bad[2] = -1; /* tokens 8..11 have no slot */
  table_vs_slots(e, &dst, &src, tokA, NTOK, slots_src, bad, 6, BS, 0, NTOK, NTOK - 4,
                 "A with block id -1 at block 2");
  table_vs_slots(e, &dst, &src, tokA, NTOK, slots_src, b4, 5, BS, 0, NTOK, 20,
                 "A with 5 blocks for 24 tokens (tokens 20..23 past the last block)");
  table_vs_slots(e, &dst, &src, tokA, NTOK, slots_src, b4, 6, BS, NTOK, NTOK, 0,
                 "A, first_token = num_tokens (writes nothing)");
  table_vs_slots(e, &dst, &src, tokB, NTOK, slots_src, b4, 6, BS, 0, 0, 0, "B (a miss)");
  q = req_table(tokA, NTOK, NULL, 0, BS, 0, NULL);
  r = retrieve_and_verify(e, &dst, &src, &q, slots_src, NTOK, 0,
                          "A with an empty block table (no token has a slot)");

  /* Retrieve with bad block tables: nothing written, result untouched. */
  kv_pattern(&dst, 8);
  kv_copy(&snap, &dst);
  memcpy(bad, b4, sizeof bad);
  bad[1] = -2;
  q = req_table(tokA, NTOK, bad, 6, BS, 0, NULL);
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "block", "block id -2 at block 1");
  bad[1] = INT32_MIN;
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "block", "block id INT32_MIN at block 1");
  bad[1] = NB; /* slots 32..35: past the cache */
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, NULL, "block id 8 (slots 32..35, past the cache)");
  bad[1] = INT32_MAX; /* slot ~ 8.6e9: past the cache, no overflow */
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, NULL, "block id INT32_MAX");
  memcpy(bad, b8, sizeof b8);
  bad[2] = 4; /* table_block_size 8: slots 32..39 */
  q = req_table(tokA, NTOK, bad, 3, 8, 0, NULL);
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, NULL,
                 "table_block_size 8, block id 4 (slots 32..39, past the cache)");
  memcpy(bad, b4, sizeof bad);
  bad[7] = 100; /* tokens 28..31: past the cached prefix, must still fail before copying */
  q = req_table(tokA, NTOK + 8, bad, 8, BS, 0, NULL);
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, NULL, "block id 100 at block 7 (past the hit)");
  q = req_table(tokA, NTOK, b4, 6, 0, 0, NULL);
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "table_block_size", "table_block_size 0");
  q = req_table(tokA, NTOK, b4, 6, -4, 0, NULL);
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "table_block_size", "table_block_size -4");
  q = req_table(tokA, NTOK, NULL, 6, BS, 0, NULL);
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "block_ids", "block_ids NULL, num_block_ids 6");
  q = req_table(tokA, NTOK, b4, -1, BS, 0, NULL);
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "num_block_ids", "num_block_ids -1");
  q = req_table(tokA, NTOK, b4, 6, BS, NTOK + 1, NULL);
  retrieve_fails(e, &q, LMC_E_INVALID_ARGUMENT, "first_token", "block table, first_token 25");
  expect_untouched(&dst, &snap, "all failed block-table retrieves");

  /* Store through a block table: the same chunks, the same result as through slots. */
  EXPECT(kv_register(e, &src, 2), LMC_OK, "register the source again [block tables]");
  table_to_slots(b4, 6, BS, NTOK, slots_t);
  q = req_table(tokC, NTOK, b4, 6, BS, 0, NULL);
  r = tr_blank();
  s = lmc_store(&r, e, &q, NULL);
  EXPECT(s, LMC_OK, "store C through a block table (table_block_size 4)");
  check_tr(&r, NTOK, NTOK, 0, TB, "store C through a block table");
  r2 = expect_store(e2, tokC, slots_t, NTOK, 0, NULL, NTOK, "C through the equivalent slots (twin engine)");
  report(tr_same_work(&r, &r2), "store through a block table %s == through slots %s", tr_str(&r),
         tr_str(&r2));
  EXPECT(kv_register(e, &dst, 2), LMC_OK, "register the destination [block tables, store]");
  q = req_slots(tokC, NTOK, slots_src, 0, NULL);
  retrieve_and_verify(e, &dst, &src, &q, slots_t, NTOK, NTOK,
                      "C (stored through a block table) into other slots");
  EXPECT(kv_register(e, &src, 2), LMC_OK, "register the source again [block tables, store]");

  table_to_slots(b8, 3, 8, NTOK, slots_t);
  q = req_table(tokD, NTOK, b8, 3, 8, 8, NULL);
  r = tr_blank();
  s = lmc_store(&r, e, &q, NULL);
  EXPECT(s, LMC_OK, "store D through a block table (table_block_size 8), first_token 8");
  check_tr(&r, 16, 16, 0, TB, "store D through a block table, skipping 8");
  r2 = expect_store(e2, tokD, slots_t, NTOK, 8, NULL, 16, "D through the equivalent slots, skipping 8 (twin)");
  report(tr_same_work(&r, &r2), "store D: block table %s == slots %s", tr_str(&r), tr_str(&r2));

  memcpy(bad, b4, sizeof bad);
  bad[3] = -1; /* tokens 12..15 (chunk 1) have no slot: chunk 0 only */
  q = req_table(tokF, NTOK, bad, 6, BS, 0, NULL);
  r = tr_blank();
  s = lmc_store(&r, e, &q, NULL);
  EXPECT(s, LMC_OK, "store F through a block table with block id -1 at block 3");
  check_tr(&r, 8, 8, 0, TB, "store F with block id -1 at block 3 (stops before chunk 1)");
  expect_lookup(e, tokF, NTOK, NULL, 8, "F (only its first chunk)");
  q = req_table(tokB, NTOK, b4, 5, BS, 0, NULL);
  r = tr_blank();
  s = lmc_store(&r, e, &q, NULL);
  EXPECT(s, LMC_OK, "store B with 5 blocks for 24 tokens");
  check_tr(&r, 16, 16, 0, TB, "store B with tokens 20..23 past the last block (chunk 2 not stored)");

  memcpy(bad, b4, sizeof bad);
  bad[4] = -3;
  q = req_table(tokB, NTOK, bad, 6, BS, 0, NULL);
  store_fails(e, &q, LMC_E_INVALID_ARGUMENT, "block", "a block table holding -3");
  bad[4] = NB;
  store_fails(e, &q, LMC_E_INVALID_ARGUMENT, NULL, "a block table holding 8 (past the cache)");
  q = req_table(tokB, NTOK, b4, 6, 0, 0, NULL);
  store_fails(e, &q, LMC_E_INVALID_ARGUMENT, "table_block_size", "table_block_size 0");
  q = req_table(tokB, NTOK, NULL, 6, BS, 0, NULL);
  store_fails(e, &q, LMC_E_INVALID_ARGUMENT, "block_ids", "block_ids NULL, num_block_ids 6");
  expect_lookup(e, tokB, NTOK, NULL, 16, "B after the failed block-table stores (still 16)");

  lmc_engine_destroy(e);
  lmc_engine_destroy(e2);
  kv_free(&src);
  kv_free(&dst);
  kv_free(&snap);
}

/* ---------------------------------------------------------------------------------------------- */
/* save_unfull_chunk and eviction                                                                   */
/* ---------------------------------------------------------------------------------------------- */

/* save_unfull_chunk: the trailing partial chunk is stored, found and retrieved. */
static void test_unfull_chunk(void) {
  lmc_engine *e = create_engine(
      "{\"chunk_size\": 8, \"save_unfull_chunk\": true, \"max_local_cpu_size\": 0.01}",
      "save_unfull_chunk");
  kvbuf src, dst;
  int32_t tok[NTOK], blocks[6] = {7, 6, 5, 4, 3, 2};
  int64_t slots_src[NTOK], slots_dst[NTOK];
  lmc_transfer_result r;
  lmc_request q;
  lmc_status s;
  if (!e) return;
  kv_alloc(&src);
  kv_alloc(&dst);
  kv_pattern(&src, 99);
  make_tokens(tok, NTOK, 9);
  make_slots(slots_src, NTOK, 3, 5);
  make_slots(slots_dst, NTOK, 11, 2);
  s = kv_register(e, &src, 2);
  EXPECT(s, LMC_OK, "register_layers [save_unfull_chunk]");
  if (s == LMC_OK) {
    r = expect_store(e, tok, slots_src, 20, 0, NULL, 20, "20 tokens [save_unfull_chunk]");
    check_tr(&r, 20, 20, 0, TB, "store 20 tokens [save_unfull_chunk]");
    expect_lookup(e, tok, 20, NULL, 20, "20 tokens [save_unfull_chunk]");
    expect_lookup(e, tok, 19, NULL, 16, "19 tokens [save_unfull_chunk]");
    s = kv_register(e, &dst, 2);
    EXPECT(s, LMC_OK, "register_layers: second buffer set [save_unfull_chunk]");
    q = req_slots(tok, 20, slots_dst, 0, NULL);
    r = retrieve_and_verify(e, &dst, &src, &q, slots_src, 20, 20, "20 tokens [save_unfull_chunk]");
    expect_tiers(&r, 3, "retrieve 20 tokens [save_unfull_chunk] (2 full chunks + 1 partial)");
    q = req_table(tok, 20, blocks, 5, BS, 3, NULL);
    retrieve_and_verify(e, &dst, &src, &q, slots_src, 20, 17,
                        "20 tokens through a block table from token 3 [save_unfull_chunk]");
  }
  lmc_engine_destroy(e);
  kv_free(&src);
  kv_free(&dst);
}

/* LRU eviction in a pool of about 4 chunks. */
static void test_eviction(void) {
  /* 4.5e-6 GB is 4500 bytes (or 4831 if GB means GiB): 4 chunks of CHUNK_BYTES = 1024 either way. */
  lmc_engine *e =
      create_engine("{\"chunk_size\": 8, \"max_local_cpu_size\": 0.0000045}", "eviction");
  kvbuf src;
  int32_t tok[6][CHUNK], big[5 * CHUNK];
  int64_t slots[5 * CHUNK];
  lmc_transfer_result r;
  lmc_stats st, st2;
  lmc_status s;
  int i;
  if (!e) return;
  kv_alloc(&src);
  kv_pattern(&src, 5);
  make_slots(slots, 5 * CHUNK, 1, 0); /* slots repeat after 32 tokens: reading them twice is fine */
  s = kv_register(e, &src, 2);
  EXPECT(s, LMC_OK, "register_layers [eviction]");
  if (s == LMC_OK) {
    for (i = 0; i < 6; i++) {
      char what[64];
      make_tokens(tok[i], CHUNK, 100 + i);
      snprintf(what, sizeof what, "one chunk #%d [eviction]", i);
      r = expect_store(e, tok[i], slots, CHUNK, 0, NULL, CHUNK, what);
      if (r.chunks_skipped_for_space != 0)
        report(0, "%s: chunks_skipped_for_space %lld (want 0: an older chunk can be evicted)", what,
               (long long)r.chunks_skipped_for_space);
    }
    get_stats(e, &st);
    report(st.pool_capacity_bytes == 4 * CHUNK_BYTES && st.cached_chunks == 4 &&
               st.evicted_chunks == 2 && st.pool_used_bytes == 4 * CHUNK_BYTES,
           "pool of 4 chunks after 6 stores: capacity %llu (want %llu), cached %llu (4), evicted "
           "%llu (2), used %llu",
           (unsigned long long)st.pool_capacity_bytes, (unsigned long long)(4 * CHUNK_BYTES),
           (unsigned long long)st.cached_chunks, (unsigned long long)st.evicted_chunks,
           (unsigned long long)st.pool_used_bytes);
    expect_lookup(e, tok[0], CHUNK, NULL, 0, "chunk #0 (least recently used, evicted)");
    expect_lookup(e, tok[1], CHUNK, NULL, 0, "chunk #1 (evicted)");
    expect_lookup(e, tok[2], CHUNK, NULL, CHUNK, "chunk #2 (kept)");
    expect_lookup(e, tok[5], CHUNK, NULL, CHUNK, "chunk #5 (kept)");

    /* One request of 5 chunks into a pool of 4: it evicts the others, never its own chunks, and
     * stops early. */
    make_tokens(big, 5 * CHUNK, 200);
    r = expect_store(e, big, slots, 5 * CHUNK, 0, NULL, 4 * CHUNK,
                     "5 chunks into a pool of 4 (stops after 4)");
    check_tr(&r, 4 * CHUNK, 4 * CHUNK, 0, TB, "store of 5 chunks into a pool of 4");
    report(r.chunks_skipped_for_space == 1, "store of 5 chunks into a pool of 4: "
           "chunks_skipped_for_space %lld (want 1)", (long long)r.chunks_skipped_for_space);
    get_stats(e, &st2);
    report(d64(st2.store_skipped_chunks, st.store_skipped_chunks) == 1 && st2.cached_chunks == 4,
           "stats: store_skipped_chunks +%llu (want 1), cached_chunks %llu (want 4)",
           (unsigned long long)d64(st2.store_skipped_chunks, st.store_skipped_chunks),
           (unsigned long long)st2.cached_chunks);
    expect_lookup(e, big, 5 * CHUNK, NULL, 4 * CHUNK, "the 5-chunk request (its first 4 chunks)");
    expect_lookup(e, tok[5], CHUNK, NULL, 0, "chunk #5 (evicted for the big request)");
  }
  lmc_engine_destroy(e);
  kv_free(&src);
}

int main(void) {
  harness_init();
  test_round_trip();
  test_block_tables();
  test_unfull_chunk();
  test_eviction();
  return harness_finish("transfer");
}
