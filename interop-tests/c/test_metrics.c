/*
 * test_metrics.c — lmc_engine_get_metrics: the size-query protocol (the one of
 * lmc_engine_get_config), bad arguments and handles, the text's shape (HELP/TYPE lines, labels,
 * histogram series), and values that follow the requests this test runs: a store of NTOK tokens,
 * a lookup that hits, a lookup that misses, a retrieve.
 */
#include "harness.h"

/* Reads the metrics through the size-query protocol; returns a malloc'ed text or NULL (one check). */
static char *get_metrics(lmc_engine *e, const char *what) {
  int64_t needed = SENTINEL_I64;
  lmc_status s = lmc_engine_get_metrics(&needed, e, NULL, 0);
  if (!report(s == LMC_E_BUFFER_TOO_SMALL && needed > 1, "%s: size query gives BUFFER_TOO_SMALL and a size (%s, %lld)",
              what, sname(s), (long long)needed))
    return NULL;
  /* Room for growth between the two calls: counters may gain digits (they do not here). */
  int64_t capacity = needed + 4096;
  char *text = malloc((size_t)capacity);
  if (!text) return NULL;
  int64_t needed2 = SENTINEL_I64;
  s = lmc_engine_get_metrics(&needed2, e, text, capacity);
  if (!report(s == LMC_OK && needed2 >= 2 && (int64_t)strlen(text) + 1 == needed2,
              "%s: LMC_OK, NUL-terminated, needed_out = strlen + 1 (%s, %lld vs %zu)", what, sname(s),
              (long long)needed2, strlen(text))) {
    free(text);
    return NULL;
  }
  return text;
}

/* The value of the sample line that starts with `prefix` (name and labels) followed by a space. */
static int sample_value(const char *text, const char *prefix, double *value) {
  size_t n = strlen(prefix);
  const char *p = text;
  while ((p = strstr(p, prefix)) != NULL) {
    if ((p == text || p[-1] == '\n') && p[n] == ' ') {
      *value = strtod(p + n + 1, NULL);
      return 1;
    }
    p += n;
  }
  return 0;
}

#define LABELS "{model_name=\"metrics \\\"test\\\"\",worker_id=\"1\",role=\"worker\"}"
#define BUCKET_LABELS(le) "{model_name=\"metrics \\\"test\\\"\",worker_id=\"1\",role=\"worker\",le=\"" le "\"}"

static void expect_sample(const char *text, const char *series, double want) {
  double got = -1;
  int found = sample_value(text, series, &got);
  report(found && got == want, "%s is %g (%s %g)", series, want, found ? "got" : "missing", got);
}

int main(void) {
  harness_init();
  note("metrics: lmc_engine_get_metrics");

  /* Arguments and handles, as for lmc_engine_get_config. */
  {
    int64_t needed = SENTINEL_I64;
    char small[8];
    EXPECT_MSG(lmc_engine_get_metrics(&needed, NULL, NULL, 0), LMC_E_INVALID_HANDLE, NULL, "NULL engine: INVALID_HANDLE");
    EXPECT_MSG(lmc_engine_get_metrics(&needed, SENTINEL_ENGINE, NULL, 0), LMC_E_INVALID_HANDLE, NULL,
               "a pointer the library never returned: INVALID_HANDLE");
    lmc_engine *e = create_engine("{\"chunk_size\": 8}", "engine for argument checks");
    if (e) {
      EXPECT_MSG(lmc_engine_get_metrics(NULL, e, small, sizeof small), LMC_E_INVALID_ARGUMENT, "needed_out",
                 "NULL needed_out: INVALID_ARGUMENT naming it");
      EXPECT_MSG(lmc_engine_get_metrics(&needed, e, NULL, 16), LMC_E_INVALID_ARGUMENT, "buffer",
                 "NULL buffer with capacity 16: INVALID_ARGUMENT naming it");
      EXPECT_MSG(lmc_engine_get_metrics(&needed, e, small, -1), LMC_E_INVALID_ARGUMENT, "capacity",
                 "negative capacity: INVALID_ARGUMENT naming it");
      memset(small, 'x', sizeof small);
      needed = SENTINEL_I64;
      lmc_status s = lmc_engine_get_metrics(&needed, e, small, sizeof small);
      capture_message();
      report(s == LMC_E_BUFFER_TOO_SMALL && needed > (int64_t)sizeof small && small[0] == 'x' && g_msg[0] != '\0',
             "8-byte buffer: BUFFER_TOO_SMALL, the size, a message, the buffer untouched (%s, %lld)", sname(s),
             (long long)needed);
      /* Before registration: zeros, no NaN, and not healthy (nothing registered). */
      char *text = get_metrics(e, "fresh engine");
      if (text) {
        report(strstr(text, "NaN") == NULL, "fresh engine: no NaN anywhere (hit rates are 0 before any request)");
        report(strstr(text, "lmcache:retrieve_hit_rate{model_name=\"smoke-model\",worker_id=\"0\",role=\"worker\"} 0\n") != NULL,
               "fresh engine: retrieve_hit_rate is 0, labelled with the model name and worker 0");
        report(strstr(text, "lmcache:lmcache_is_healthy{model_name=\"smoke-model\",worker_id=\"0\",role=\"worker\"} 0\n") != NULL,
               "fresh engine: lmcache_is_healthy is 0 before layers are registered");
        free(text);
      }
      lmc_engine_destroy(e);
      EXPECT_MSG(lmc_engine_get_metrics(&needed, e, NULL, 0), LMC_E_INVALID_HANDLE, NULL, "destroyed engine: INVALID_HANDLE");
    }
  }

  /* Values after a scripted run. The model name needs escaping in label values. */
  lmc_engine *e = NULL;
  lmc_status cs = lmc_engine_create(&e, "{\"chunk_size\": 8}", "metrics \"test\"", 2, 1);
  if (!EXPECT(cs, LMC_OK, "engine with a quoted model name, world_size 2, worker 1")) return harness_finish("metrics");
  kvbuf src, dst;
  kv_alloc(&src);
  kv_alloc(&dst);
  kv_pattern(&src, 7);
  EXPECT(kv_register(e, &src, MAXL), LMC_OK, "register layers");
  int32_t tokens[NTOK], other[NTOK];
  int64_t slots[NTOK];
  make_tokens(tokens, NTOK, 11);
  make_tokens(other, NTOK, 99);
  make_slots(slots, NTOK, 5, 3);
  expect_store(e, tokens, slots, NTOK, 0, NULL, NTOK, "store 24 tokens (3 chunks)");
  expect_lookup(e, tokens, NTOK, NULL, NTOK, "lookup hit: 24 tokens");
  expect_lookup(e, other, NTOK, NULL, 0, "lookup miss: 0 tokens");
  EXPECT(kv_register(e, &dst, MAXL), LMC_OK, "register the destination layers (same namespace: cache kept)");
  lmc_request req = req_slots(tokens, NTOK, slots, 0, NULL);
  retrieve_and_verify(e, &dst, &src, &req, slots, NTOK, NTOK, "retrieve 24 tokens");

  char *text = get_metrics(e, "after the run");
  if (text) {
    expect_sample(text, "lmcache:num_store_requests_total" LABELS, 1);
    expect_sample(text, "lmcache:num_stored_tokens_total" LABELS, NTOK);
    expect_sample(text, "lmcache:num_lookup_requests_total" LABELS, 2);
    expect_sample(text, "lmcache:num_lookup_tokens_total" LABELS, 2 * NTOK);
    expect_sample(text, "lmcache:num_lookup_hits_total" LABELS, NTOK);
    expect_sample(text, "lmcache:lookup_0_hit_requests_total" LABELS, 1);
    expect_sample(text, "lmcache:num_retrieve_requests_total" LABELS, 1);
    expect_sample(text, "lmcache:num_requested_tokens_total" LABELS, NTOK);
    expect_sample(text, "lmcache:num_hit_tokens_total" LABELS, NTOK);
    expect_sample(text, "lmcache:num_stored_bytes_total" LABELS, (double)(NTOK * TOKEN_BYTES));
    expect_sample(text, "lmcache:lookup_hit_rate" LABELS, 0.5);
    expect_sample(text, "lmcache:retrieve_hit_rate" LABELS, 1);
    expect_sample(text, "lmcache:local_cache_usage" LABELS, (double)(3 * CHUNK_BYTES));
    expect_sample(text, "lmcache:active_memory_objs_count" LABELS, 3);
    expect_sample(text, "lmcache:pinned_memory_objs_count" LABELS, 0);
    expect_sample(text, "lmcache:lmcache_is_healthy" LABELS, 1);
    /* Histograms: one observation each for stores and retrieves, two for lookups; +Inf == count. */
    expect_sample(text, "lmcache:time_to_store_count" LABELS, 1);
    expect_sample(text, "lmcache:time_to_store_bucket" BUCKET_LABELS("+Inf"), 1);
    expect_sample(text, "lmcache:time_to_lookup_count" LABELS, 2);
    expect_sample(text, "lmcache:time_to_lookup_bucket" BUCKET_LABELS("+Inf"), 2);
    expect_sample(text, "lmcache:time_to_retrieve_count" LABELS, 1);
    expect_sample(text, "lmcache:retrieve_speed_count" LABELS, 1);
    /* LMCache's bucket bounds, written as prometheus_client writes them. */
    report(strstr(text, "lmcache:time_to_lookup_bucket" BUCKET_LABELS("1e-05")) != NULL &&
               strstr(text, "lmcache:time_to_lookup_bucket" BUCKET_LABELS("5.24288")) != NULL &&
               strstr(text, "lmcache:time_to_retrieve_bucket" BUCKET_LABELS("0.001")) != NULL &&
               strstr(text, "lmcache:time_to_retrieve_bucket" BUCKET_LABELS("10.0")) != NULL &&
               strstr(text, "lmcache:store_speed_bucket" BUCKET_LABELS("65536.0")) != NULL,
           "histograms carry LMCache's bucket bounds (1e-05 .. 5.24288 s, 0.001 .. 10.0 s, .. 65536.0 tokens/s)");
    report(strstr(text, "# TYPE lmcache:num_hit_tokens_total counter\n") != NULL &&
               strstr(text, "# HELP lmcache:num_hit_tokens_total Total number of tokens hit in lmcache\n") != NULL &&
               strstr(text, "# TYPE lmcache:time_to_retrieve histogram\n") != NULL &&
               strstr(text, "# TYPE lmcache:local_cache_usage gauge\n") != NULL,
           "HELP and TYPE lines name each family (counters with _total)");
    report(strstr(text, "lmcache:num_retrieve_hit_chunks_total{model_name=\"metrics \\\"test\\\"\",worker_id=\"1\",role=\"worker\","
                        "backend=\"LocalCPUBackend\"} 3\n") != NULL,
           "per-backend retrieve hits: 3 chunks from LocalCPUBackend");
    free(text);
  }
  lmc_engine_destroy(e);
  kv_free(&src);
  kv_free(&dst);
  return harness_finish("metrics");
}
