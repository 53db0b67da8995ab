/*
 * test_tiers.c — the local disk tier: write-behind and lmc_engine_flush, lmc_engine_tier_count and
 * lmc_engine_get_tier_stats, lookups and retrieves served by the disk (tokens_by_tier /
 * chunks_by_tier), prefetch jobs that promote chunks into the CPU tier, destroyed handles.
 */
#include "harness.h"

#include <stdlib.h>

#define TB ((int64_t)TOKEN_BYTES)

static void lookup_tiers(lmc_engine *e, const int32_t *tok, int64_t n, int64_t hit, int64_t t0,
                         int64_t t1, const char *what) {
  lmc_lookup_result r = lr_blank();
  lmc_request q = req_tokens(tok, n, NULL);
  lmc_status s = lmc_lookup(&r, e, &q);
  report(s == LMC_OK && r.hit_tokens == hit && r.tokens_by_tier[0] == t0 &&
             r.tokens_by_tier[1] == t1 && r.tokens_by_tier[2] == 0 && r.tokens_by_tier[3] == 0,
         "lookup %s -> %s %s (want hit %lld, tokens_by_tier [%lld %lld 0 0])", what, sname(s),
         lr_str(&r), (long long)hit, (long long)t0, (long long)t1);
}

static int get_tier0(lmc_engine *e, lmc_tier_stats *ts) {
  memset(ts, 0, sizeof *ts);
  ts->struct_size = (uint32_t)sizeof *ts;
  return lmc_engine_get_tier_stats(e, 0, ts) == LMC_OK;
}

static void test_disk_tier(void) {
  char dir[] = "/tmp/lmcn-tiers-XXXXXX";
  char config[256];
  lmc_engine *e;
  kvbuf src, dst, expect;
  int32_t tok[NTOK], tok2[NTOK];
  int64_t slots[NTOK];
  int32_t count = -1;
  lmc_tier_stats ts, ts0;
  lmc_transfer_result r;
  lmc_request q;
  lmc_job *job = NULL;
  lmc_status s;
  char where[200];
  if (!mkdtemp(dir)) {
    report(0, "mkdtemp for the disk tier");
    return;
  }
  snprintf(config, sizeof config,
           "{\"chunk_size\": 8, \"max_local_cpu_size\": 0.01, \"local_disk\": \"%s\", "
           "\"max_local_disk_size\": 0.01}",
           dir);
  e = create_engine(config, "disk tier");
  if (!e) return;
  kv_alloc(&src);
  kv_alloc(&dst);
  kv_alloc(&expect);
  kv_pattern(&src, 21);
  make_tokens(tok, NTOK, 9);
  make_tokens(tok2, NTOK, 10);
  make_slots(slots, NTOK, 7, 1);
  EXPECT(kv_register(e, &src, 2), LMC_OK, "register_layers [tiers]");
  r = expect_store(e, tok, slots, NTOK, 0, NULL, NTOK, "into CPU, written behind to disk");
  check_tr(&r, NTOK, NTOK, 0, TB, "store with a disk tier");
  EXPECT(lmc_engine_flush(e, -1), LMC_OK, "lmc_engine_flush(-1) waits for the disk writes");
  EXPECT(lmc_engine_flush(e, 0), LMC_OK, "lmc_engine_flush(0) with nothing pending");
  EXPECT_MSG(lmc_engine_flush(e, -2), LMC_E_INVALID_ARGUMENT, "timeout_ms", "lmc_engine_flush(-2)");
  EXPECT(lmc_engine_flush(NULL, 0), LMC_E_INVALID_HANDLE, "lmc_engine_flush(NULL)");

  s = lmc_engine_tier_count(&count, e);
  report(s == LMC_OK && count == 1, "lmc_engine_tier_count -> %s, %d (want 1)", sname(s), (int)count);
  EXPECT_MSG(lmc_engine_tier_count(NULL, e), LMC_E_INVALID_ARGUMENT, "count_out", "tier_count(NULL)");
  s = get_tier0(e, &ts) ? LMC_OK : LMC_E_INTERNAL;
  report(s == LMC_OK && strcmp(ts.name, "LocalDiskBackend") == 0 && ts.writes == NTOK / CHUNK &&
             ts.bytes_written == NTOK * TOKEN_BYTES && ts.used_bytes > ts.bytes_written &&
             ts.capacity_bytes > 0,
         "tier 0 stats: %s name %s writes %llu bytes_written %llu used %llu capacity %llu", sname(s),
         ts.name, (unsigned long long)ts.writes, (unsigned long long)ts.bytes_written,
         (unsigned long long)ts.used_bytes, (unsigned long long)ts.capacity_bytes);
  EXPECT(lmc_engine_get_tier_stats(e, 1, &ts), LMC_E_NOT_FOUND, "tier stats index 1 of 1");
  EXPECT(lmc_engine_get_tier_stats(e, -1, &ts), LMC_E_NOT_FOUND, "tier stats index -1");
  EXPECT(lmc_engine_get_tier_stats(e, 0, NULL), LMC_E_INVALID_ARGUMENT, "tier stats NULL");
  ts.struct_size = 4;
  EXPECT(lmc_engine_get_tier_stats(e, 0, &ts), LMC_E_INVALID_ARGUMENT, "tier stats struct_size 4");

  lookup_tiers(e, tok, NTOK, NTOK, NTOK, 0, "in the CPU tier (and on disk)");

  /* Drop the CPU copies: lookups find the disk. */
  EXPECT(lmc_engine_clear(e), LMC_OK, "clear the CPU tier");
  lookup_tiers(e, tok, NTOK, NTOK, 0, NTOK, "after clear: all on disk");

  /* A prefetch brings them back from disk. */
  get_tier0(e, &ts0);
  q = req_tokens(tok, NTOK, NULL);
  s = lmc_prefetch_start(&job, e, &q);
  EXPECT(s, LMC_OK, "lmc_prefetch_start");
  if (s == LMC_OK) {
    r = tr_blank();
    s = lmc_job_wait(&r, job, -1);
    EXPECT(s, LMC_OK, "lmc_job_wait(prefetch, -1)");
    check_tr(&r, NTOK, ANY, 0, TB, "prefetch from disk");
    report(r.chunks_by_tier[1] == NTOK / CHUNK,
           "prefetch result: chunks_by_tier[1] %lld (want %d: all from disk)",
           (long long)r.chunks_by_tier[1], NTOK / CHUNK);
    r = tr_blank();
    EXPECT(lmc_job_wait(&r, job, 0), LMC_OK, "lmc_job_wait(0) on the finished prefetch");
    report(r.tokens_matched == NTOK, "lmc_job_wait(0) again: matched %lld", (long long)r.tokens_matched);
    lmc_job_destroy(job);
  }
  get_tier0(e, &ts);
  report(d64(ts.hits, ts0.hits) == NTOK / CHUNK && d64(ts.bytes_read, ts0.bytes_read) == NTOK * TOKEN_BYTES,
         "prefetch read %llu chunks (want %d), %llu bytes (want %llu) from disk",
         (unsigned long long)d64(ts.hits, ts0.hits), NTOK / CHUNK,
         (unsigned long long)d64(ts.bytes_read, ts0.bytes_read), (unsigned long long)(NTOK * TOKEN_BYTES));
  lookup_tiers(e, tok, NTOK, NTOK, NTOK, 0, "after the prefetch: all in the CPU tier again");

  /* The promoted chunks retrieve bit-exact into a second buffer, all from the CPU tier. */
  kv_fill(&dst, GUARD_VALUE);
  kv_copy(&expect, &dst);
  apply_retrieve(&expect, &src, slots, slots, 0, NTOK, 2);
  EXPECT(kv_register(e, &dst, 2), LMC_OK, "register the destination [tiers]");
  q = req_slots(tok, NTOK, slots, 0, NULL);
  r = tr_blank();
  s = lmc_retrieve(&r, e, &q, NULL);
  where[0] = '\0';
  report(s == LMC_OK && kv_equal(&dst, &expect, where, sizeof where),
         "retrieve after prefetch -> %s, bit-exact %s", sname(s), where);
  check_tr(&r, NTOK, NTOK, NTOK / CHUNK, TB, "retrieve after prefetch (all from the CPU tier)");

  /* Retrieve straight from disk, and from both tiers. */
  EXPECT(lmc_engine_clear(e), LMC_OK, "clear the CPU tier again");
  kv_fill(&dst, GUARD_VALUE);
  r = tr_blank();
  s = lmc_retrieve(&r, e, &q, NULL);
  where[0] = '\0';
  report(s == LMC_OK && kv_equal(&dst, &expect, where, sizeof where),
         "retrieve from disk -> %s, bit-exact %s", sname(s), where);
  check_tr(&r, NTOK, NTOK, 0, TB, "retrieve from disk");
  report(r.chunks_by_tier[1] == NTOK / CHUNK, "retrieve from disk: chunks_by_tier[1] %lld (want %d)",
         (long long)r.chunks_by_tier[1], NTOK / CHUNK);
  lookup_tiers(e, tok, NTOK, NTOK, NTOK, 0, "after the retrieve promoted the chunks");

  /* tok2: first chunk in the CPU tier only after a clear and a store of 8 tokens. */
  EXPECT(kv_register(e, &src, 2), LMC_OK, "register the source again [tiers]");
  expect_store(e, tok2, slots, NTOK, 0, NULL, NTOK, "tok2 into CPU and disk");
  EXPECT(lmc_engine_flush(e, 10000), LMC_OK, "lmc_engine_flush(10 s)");
  EXPECT(lmc_engine_clear(e), LMC_OK, "clear the CPU tier [tok2]");
  expect_store(e, tok2, slots, 8, 0, NULL, 8, "tok2's first chunk again (CPU)");
  lookup_tiers(e, tok2, NTOK, NTOK, 8, 16, "tok2: 1 chunk in the CPU tier, 2 only on disk");
  EXPECT(kv_register(e, &dst, 2), LMC_OK, "register the destination [tok2]");
  kv_fill(&dst, GUARD_VALUE);
  kv_copy(&expect, &dst);
  apply_retrieve(&expect, &src, slots, slots, 0, NTOK, 2);
  q = req_slots(tok2, NTOK, slots, 0, NULL);
  r = tr_blank();
  s = lmc_retrieve(&r, e, &q, NULL);
  where[0] = '\0';
  report(s == LMC_OK && kv_equal(&dst, &expect, where, sizeof where),
         "retrieve tok2 from both tiers -> %s, bit-exact %s", sname(s), where);
  check_tr(&r, NTOK, NTOK, 1, TB, "retrieve tok2 from both tiers");
  report(r.chunks_by_tier[1] == 2, "retrieve tok2: chunks_by_tier[1] %lld (want 2)",
         (long long)r.chunks_by_tier[1]);

  lmc_engine_destroy(e);
  EXPECT(lmc_engine_flush(e, 0), LMC_E_INVALID_HANDLE, "destroyed handle: lmc_engine_flush");
  EXPECT(lmc_engine_tier_count(&count, e), LMC_E_INVALID_HANDLE, "destroyed handle: tier_count");
  EXPECT(lmc_engine_get_tier_stats(e, 0, &ts), LMC_E_INVALID_HANDLE, "destroyed handle: tier stats");
  q = req_tokens(tok, NTOK, NULL);
  job = SENTINEL_JOB;
  EXPECT(lmc_prefetch_start(&job, e, &q), LMC_E_INVALID_HANDLE, "destroyed handle: prefetch_start");
  report(job == SENTINEL_JOB, "destroyed handle: prefetch_start leaves job_out untouched");

  /* A second engine on the same directory finds the records (seed-free keys). */
  e = create_engine(config, "disk tier, second engine on the same directory");
  if (e) {
    EXPECT(kv_register(e, &dst, 2), LMC_OK, "register_layers [second engine]");
    lookup_tiers(e, tok, NTOK, NTOK, 0, NTOK, "from a new engine: all on disk");
    lmc_engine_destroy(e);
  }
  {
    lmc_engine *none = create_engine("{\"chunk_size\": 8}", "no lower tiers");
    count = -1;
    if (none) {
      s = lmc_engine_tier_count(&count, none);
      report(s == LMC_OK && count == 0, "lmc_engine_tier_count without lower tiers -> %s, %d (want 0)",
             sname(s), (int)count);
      memset(&ts, 0, sizeof ts);
      ts.struct_size = (uint32_t)sizeof ts;
      EXPECT(lmc_engine_get_tier_stats(none, 0, &ts), LMC_E_NOT_FOUND, "tier stats index 0 of 0");
      EXPECT(lmc_engine_flush(none, 0), LMC_OK, "lmc_engine_flush without lower tiers");
    }
    lmc_engine_destroy(none);
  }
  kv_free(&src);
  kv_free(&dst);
  kv_free(&expect);
  {
    char command[300];
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    report(system(command) == 0, "remove the disk tier directory");
  }
}

int main(void) {
  harness_init();
  test_disk_tier();
  return harness_finish("tiers");
}
