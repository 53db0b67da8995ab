/*
 * test_events.c — KV events (enable_kv_events) through lmc_engine_poll_events: BLOCK_STORED per new
 * chunk with its tokens and parent chain, BLOCK_REMOVED for exactly the chunks LRU evicts,
 * ALL_BLOCKS_CLEARED on lmc_engine_clear, the bounded queue's drop count, hash lengths per hash
 * algorithm, the token buffer protocol, a caller's larger event stride, and argument errors.
 */
#include "harness.h"

#define MAXEV 64

typedef struct polled {
  lmc_kv_event ev[MAXEV];
  int32_t tok[MAXEV * CHUNK];
  int64_t n;
  int64_t ntok;
  uint64_t dropped;
} polled;

/* Polls until the queue is empty (several polls of at most `per_poll` events); returns the status
 * of the last poll. */
static lmc_status poll_all(lmc_engine *e, polled *p, int64_t per_poll) {
  lmc_status s;
  memset(p, 0, sizeof *p);
  for (;;) {
    int64_t n = -1, ntok = -1, i;
    uint64_t dropped = 0;
    int64_t room = MAXEV - p->n < per_poll ? MAXEV - p->n : per_poll;
    s = lmc_engine_poll_events(&n, &ntok, &dropped, e, p->ev + p->n, (uint32_t)sizeof(lmc_kv_event),
                               room, p->tok + p->ntok, (int64_t)(MAXEV * CHUNK) - p->ntok);
    if (s != LMC_OK) return s;
    for (i = p->n; i < p->n + n; i++) p->ev[i].token_ids_offset += p->ntok; /* global offsets */
    p->n += n;
    p->ntok += ntok;
    p->dropped += dropped;
    if (n == 0 || p->n == MAXEV) return s;
  }
}

static int is_zero(const uint8_t *b, size_t from, size_t to) {
  size_t i;
  for (i = from; i < to; i++)
    if (b[i] != 0) return 0;
  return 1;
}

static int same_hash(const lmc_kv_event *a, const lmc_kv_event *b) {
  return a->hash_len == b->hash_len && memcmp(a->block_hash, b->block_hash, a->hash_len) == 0;
}

static lmc_engine *events_engine(const char *extra, double pool_chunks, kvbuf *src) {
  char config[512];
  lmc_engine *e;
  snprintf(config, sizeof config,
           "{\"chunk_size\": %d, \"save_unfull_chunk\": true, \"max_local_cpu_size\": %.17g, "
           "\"enable_kv_events\": true%s}",
           CHUNK, pool_chunks * (double)CHUNK_BYTES / (double)(1u << 30), extra);
  e = create_engine(config, "events on");
  if (e && kv_register(e, src, 2) != LMC_OK) {
    report(0, "register layers [%s]", extra);
    lmc_engine_destroy(e);
    return NULL;
  }
  return e;
}

static void store_n(lmc_engine *e, const int32_t *tok, int64_t n, const int64_t *slots, const char *what) {
  expect_store(e, tok, slots, n, 0, NULL, n, what);
}

static void test_disabled(kvbuf *src) {
  int32_t tok[NTOK];
  int64_t slots[NTOK];
  int64_t n = -1, ntok = -1;
  uint64_t dropped = 99;
  lmc_kv_event ev[4];
  int32_t ids[64];
  lmc_engine *e = create_engine("{\"chunk_size\": 8, \"max_local_cpu_size\": 0.01}", "events off");
  if (!e) return;
  kv_register(e, src, 2);
  make_tokens(tok, NTOK, 1);
  make_slots(slots, NTOK, 7, 1);
  store_n(e, tok, NTOK, slots, "store with events off");
  lmc_engine_clear(e);
  EXPECT(lmc_engine_poll_events(&n, &ntok, &dropped, e, ev, (uint32_t)sizeof ev[0], 4, ids, 64), LMC_OK,
         "poll with enable_kv_events off");
  report(n == 0 && ntok == 0 && dropped == 0, "events off: nothing queued (%lld events, %lld ids, %llu dropped)",
         (long long)n, (long long)ntok, (unsigned long long)dropped);
  lmc_engine_destroy(e);
}

static void test_store_clear_and_buffers(kvbuf *src) {
  int32_t tok[NTOK + 4];
  int64_t slots[NTOK + 4];
  polled p;
  int i, ok;
  int64_t n = -1, ntok = -1;
  uint64_t dropped = 0;
  unsigned char wide[3 * 128];
  lmc_kv_event *w;
  lmc_engine *e = events_engine("", 64, src);
  if (!e) return;
  make_tokens(tok, NTOK + 4, 3);
  make_slots(slots, NTOK + 4, 7, 1);
  store_n(e, tok, NTOK + 4, slots, "store 3 full chunks and a partial one");

  /* A token buffer smaller than the next event's tokens: refused, nothing taken. */
  EXPECT_MSG(lmc_engine_poll_events(&n, &ntok, &dropped, e, p.ev, (uint32_t)sizeof p.ev[0], 4, p.tok, CHUNK - 1),
             LMC_E_BUFFER_TOO_SMALL, "token", "poll with token_capacity chunk_size - 1");
  /* Capacity 0 is a valid way to ask for the drop count only. */
  EXPECT(lmc_engine_poll_events(&n, &ntok, &dropped, e, NULL, 0, 0, NULL, 0), LMC_OK, "poll with capacity 0");
  report(n == 0 && ntok == 0, "capacity 0 takes nothing");

  EXPECT(poll_all(e, &p, 1), LMC_OK, "poll one event at a time");
  report(p.n == 4 && p.ntok == NTOK + 4 && p.dropped == 0, "4 BLOCK_STORED events, %d token ids (got %lld, %lld, dropped %llu)",
         NTOK + 4, (long long)p.n, (long long)p.ntok, (unsigned long long)p.dropped);
  ok = p.n == 4;
  for (i = 0; ok && i < 4; i++) {
    const lmc_kv_event *v = &p.ev[i];
    int count = i < 3 ? CHUNK : 4;
    ok = v->struct_size == sizeof(lmc_kv_event) && v->kind == LMC_KV_EVENT_BLOCK_STORED &&
         v->medium == LMC_KV_MEDIUM_CPU && v->hash_len == 32 && v->token_count == (uint32_t)count &&
         v->token_ids_count == count &&
         memcmp(p.tok + v->token_ids_offset, tok + i * CHUNK, (size_t)count * sizeof(int32_t)) == 0 &&
         (i == 0 ? v->parent_hash_len == 0 && is_zero(v->parent_hash, 0, 32)
                 : v->parent_hash_len == 32 && memcmp(v->parent_hash, p.ev[i - 1].block_hash, 32) == 0) &&
         (i == 0 || !same_hash(v, &p.ev[i - 1]));
    if (!ok) note("event %d differs", i);
  }
  report(ok, "each event: CPU, 32-byte sha256 hash, its tokens, parent = previous chunk's hash (none for the first)");

  /* The same prefix again adds no chunk, so no event. */
  store_n(e, tok, NTOK + 4, slots, "store the same prefix again");
  EXPECT(poll_all(e, &p, MAXEV), LMC_OK, "poll after the repeated store");
  report(p.n == 0, "a repeated store announces nothing (%lld events)", (long long)p.n);

  /* A caller compiled with a larger lmc_kv_event: its stride is respected. */
  EXPECT(lmc_engine_clear(e), LMC_OK, "clear");
  memset(wide, 0xCD, sizeof wide);
  EXPECT(lmc_engine_poll_events(&n, &ntok, &dropped, e, (lmc_kv_event *)(void *)wide, 128, 3, p.tok, 64), LMC_OK,
         "poll with event_size 128");
  w = (lmc_kv_event *)(void *)wide;
  report(n == 1 && w->struct_size == sizeof(lmc_kv_event) && w->kind == LMC_KV_EVENT_ALL_BLOCKS_CLEARED &&
             w->medium == LMC_KV_MEDIUM_CPU && w->hash_len == 0 && w->token_count == 0 && ntok == 0 &&
             wide[sizeof(lmc_kv_event)] == 0xCD && wide[128] == 0xCD,
         "clear -> one ALL_BLOCKS_CLEARED (CPU, no hash); bytes past sizeof(lmc_kv_event) untouched");
  lmc_engine_destroy(e);
}

static void test_eviction(kvbuf *src) {
  enum { POOL = 2, PROMPTS = 5 };
  int32_t tok[CHUNK];
  int64_t slots[CHUNK];
  lmc_kv_event stored[PROMPTS];
  polled p;
  int i, k, nstored = 0, nremoved = 0, ok = 1;
  lmc_engine *e = events_engine("", POOL, src);
  if (!e) return;
  make_slots(slots, CHUNK, 7, 1);
  for (i = 0; i < PROMPTS; i++) {
    make_tokens(tok, CHUNK, 100 + i);
    store_n(e, tok, CHUNK, slots, "store a one-chunk prompt into a pool of 2 chunks");
  }
  EXPECT(poll_all(e, &p, MAXEV), LMC_OK, "poll after the stores");
  for (k = 0; k < p.n; k++)
    if (p.ev[k].kind == LMC_KV_EVENT_BLOCK_STORED && nstored < PROMPTS) stored[nstored++] = p.ev[k];
  report(nstored == PROMPTS, "one BLOCK_STORED per prompt (%d)", nstored);
  /* LRU over one-chunk prompts stored in order: prompts 0 .. PROMPTS-POOL-1 are evicted, in order. */
  for (k = 0; k < p.n && nstored == PROMPTS; k++) {
    if (p.ev[k].kind != LMC_KV_EVENT_BLOCK_REMOVED) continue;
    ok = ok && nremoved < PROMPTS - POOL && p.ev[k].medium == LMC_KV_MEDIUM_CPU &&
         same_hash(&p.ev[k], &stored[nremoved]) && p.ev[k].token_count == CHUNK &&
         p.ev[k].token_ids_count == 0 && p.ev[k].parent_hash_len == 0;
    nremoved++;
  }
  report(ok && nremoved == PROMPTS - POOL,
         "BLOCK_REMOVED (CPU) for exactly the %d evicted prompts, oldest first (got %d)", PROMPTS - POOL, nremoved);
  lmc_engine_destroy(e);
}

static void test_overflow_and_xxh3(kvbuf *src) {
  int32_t tok[NTOK];
  int64_t slots[NTOK];
  polled p;
  lmc_engine *e = events_engine(", \"kv_events_queue_size\": 2", 64, src);
  if (!e) return;
  make_tokens(tok, NTOK, 5);
  make_slots(slots, NTOK, 7, 1);
  store_n(e, tok, NTOK, slots, "store 3 chunks into a queue of 2");
  EXPECT(poll_all(e, &p, MAXEV), LMC_OK, "poll the full queue");
  report(p.n == 2 && p.dropped == 1, "the queue keeps 2 events and reports 1 dropped (got %lld, %llu)", (long long)p.n,
         (unsigned long long)p.dropped);
  EXPECT(poll_all(e, &p, MAXEV), LMC_OK, "poll again");
  report(p.n == 0 && p.dropped == 0, "drops are reported once");
  lmc_engine_destroy(e);

  e = events_engine(", \"pre_caching_hash_algorithm\": \"xxh3_128\"", 64, src);
  if (!e) return;
  store_n(e, tok, NTOK, slots, "store with xxh3_128 keys");
  EXPECT(poll_all(e, &p, MAXEV), LMC_OK, "poll (xxh3_128)");
  report(p.n == 3 && p.ev[0].hash_len == 16 && is_zero(p.ev[0].block_hash, 16, 32) && !is_zero(p.ev[0].block_hash, 0, 16) &&
             p.ev[1].parent_hash_len == 16 && memcmp(p.ev[1].parent_hash, p.ev[0].block_hash, 16) == 0,
         "xxh3_128: 16-byte hashes, the rest zero, parent chain intact");
  lmc_engine_destroy(e);
}

static void test_arguments(kvbuf *src) {
  int64_t n = SENTINEL_I64, ntok = SENTINEL_I64;
  uint64_t dropped = 7;
  lmc_kv_event ev[2];
  int32_t ids[16];
  lmc_engine *e = events_engine("", 64, src);
  if (!e) return;
  EXPECT(lmc_engine_poll_events(&n, &ntok, &dropped, NULL, ev, (uint32_t)sizeof ev[0], 2, ids, 16),
         LMC_E_INVALID_HANDLE, "poll with a NULL engine");
  EXPECT_MSG(lmc_engine_poll_events(NULL, &ntok, &dropped, e, ev, (uint32_t)sizeof ev[0], 2, ids, 16),
             LMC_E_INVALID_ARGUMENT, "num_events_out", "poll with num_events_out NULL");
  EXPECT_MSG(lmc_engine_poll_events(&n, NULL, &dropped, e, ev, (uint32_t)sizeof ev[0], 2, ids, 16),
             LMC_E_INVALID_ARGUMENT, "num_token_ids_out", "poll with num_token_ids_out NULL");
  EXPECT_MSG(lmc_engine_poll_events(&n, &ntok, NULL, e, ev, (uint32_t)sizeof ev[0], 2, ids, 16),
             LMC_E_INVALID_ARGUMENT, "dropped_out", "poll with dropped_out NULL");
  EXPECT_MSG(lmc_engine_poll_events(&n, &ntok, &dropped, e, NULL, (uint32_t)sizeof ev[0], 2, ids, 16),
             LMC_E_INVALID_ARGUMENT, "events", "poll with events NULL and capacity 2");
  EXPECT_MSG(lmc_engine_poll_events(&n, &ntok, &dropped, e, ev, 100, 2, ids, 16), LMC_E_INVALID_ARGUMENT,
             "event_size", "poll with event_size 100");
  EXPECT_MSG(lmc_engine_poll_events(&n, &ntok, &dropped, e, ev, (uint32_t)sizeof ev[0], -1, ids, 16),
             LMC_E_INVALID_ARGUMENT, "capacity", "poll with capacity -1");
  EXPECT_MSG(lmc_engine_poll_events(&n, &ntok, &dropped, e, ev, (uint32_t)sizeof ev[0], 2, NULL, 16),
             LMC_E_INVALID_ARGUMENT, "token_ids", "poll with token_ids NULL and token_capacity 16");
  EXPECT_MSG(lmc_engine_poll_events(&n, &ntok, &dropped, e, ev, (uint32_t)sizeof ev[0], 2, ids, -1),
             LMC_E_INVALID_ARGUMENT, "token_capacity", "poll with token_capacity -1");
  report(n == SENTINEL_I64 && ntok == SENTINEL_I64 && dropped == 7, "failed polls leave the out-parameters untouched");
  lmc_engine_destroy(e);
  EXPECT(lmc_engine_poll_events(&n, &ntok, &dropped, e, ev, (uint32_t)sizeof ev[0], 2, ids, 16),
         LMC_E_INVALID_HANDLE, "poll a destroyed engine");
}

int main(void) {
  kvbuf src;
  harness_init();
  kv_alloc(&src);
  kv_pattern(&src, 31);
  test_disabled(&src);
  test_store_clear_and_buffers(&src);
  test_eviction(&src);
  test_overflow_and_xxh3(&src);
  test_arguments(&src);
  kv_free(&src);
  return harness_finish("events");
}
