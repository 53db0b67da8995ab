/*
 * test_jobs.c — asynchronous work: lmc_store / lmc_retrieve with job_out, lmc_prefetch_start,
 * lmc_job_wait / lmc_job_poll / lmc_job_result / lmc_job_destroy.
 *
 *  - a job's result equals the synchronous call's result for the same work (twin engines);
 *  - the request's buffers may be reused as soon as the call returned;
 *  - argument errors come from the call itself, job_out untouched;
 *  - a job that is really still running (its engine's remote tier is a server that never answers,
 *    so the first lower-tier read waits blocking_timeout_secs): poll says 0, lmc_job_result and
 *    short waits say LMC_E_TIMEOUT and leave the result untouched; destroying it while it runs,
 *    and destroying its engine while it runs, are safe;
 *  - wrong-kind handles: a job given to engine functions and an engine given to job functions are
 *    LMC_E_INVALID_HANDLE and leave the other object working.
 */
#include "harness.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TB ((int64_t)TOKEN_BYTES)

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(long ms) {
  struct timespec ts;
  ts.tv_sec = ms / 1000;
  ts.tv_nsec = (ms % 1000) * 1000000L;
  nanosleep(&ts, NULL);
}

/* Polls until the job has finished; returns 1 when it did within timeout_ms. */
static int poll_until_finished(lmc_job *job, int64_t timeout_ms) {
  int64_t end = now_ms() + timeout_ms;
  for (;;) {
    int32_t finished = -1;
    if (lmc_job_poll(&finished, job) != LMC_OK) return 0;
    if (finished == 1) return 1;
    if (now_ms() > end) return 0;
    sleep_ms(1);
  }
}

/* ---------------------------------------------------------------------------------------------- */
/* Store and retrieve jobs on host layers                                                          */
/* ---------------------------------------------------------------------------------------------- */

static void test_transfer_jobs(void) {
  const char *config = "{\"chunk_size\": 8, \"max_local_cpu_size\": 0.01}";
  kvbuf src, dst, dst2, expect;
  lmc_engine *e = create_engine(config, "transfer jobs");
  lmc_engine *twin = create_engine(config, "transfer jobs, synchronous twin");
  int32_t tokens[NTOK], scratch_tok[NTOK], blocks[6] = {6, 0, 5, 1, 4, 2}, scratch_blocks[6];
  int64_t slots[NTOK], scratch_slots[NTOK], table_slots[NTOK];
  lmc_job *job = SENTINEL_JOB;
  void *stream = (void *)(uintptr_t)0x1234;
  lmc_transfer_result r, sync, untouched;
  lmc_request q;
  lmc_stats st;
  int32_t finished;
  char where[200];
  int ok;
  if (!e || !twin) {
    lmc_engine_destroy(e);
    lmc_engine_destroy(twin);
    return;
  }
  kv_alloc(&src);
  kv_alloc(&dst);
  kv_alloc(&dst2);
  kv_alloc(&expect);
  kv_pattern(&src, 21);
  make_tokens(tokens, NTOK, 21);
  make_slots(slots, NTOK, 7, 1);
  table_to_slots(blocks, 6, BS, NTOK, table_slots);

  q = req_slots(tokens, NTOK, slots, 0, "a");
  q.stream = stream;
  r = tr_blank();
  EXPECT_MSG(lmc_store(&r, e, &q, &job), LMC_E_INVALID_ARGUMENT, "register",
             "lmc_store with a job before register_layers");
  report(job == SENTINEL_JOB && tr_is_blank(&r),
         "a failed lmc_store with a job leaves job_out and result_out untouched");
  EXPECT(kv_register(e, &src, MAXL), LMC_OK, "register host layers for the jobs");
  EXPECT(kv_register(twin, &src, MAXL), LMC_OK, "register host layers for the twin");

  /* Argument errors are the call's, in both modes. */
  EXPECT(lmc_store(&r, SENTINEL_ENGINE, &q, &job), LMC_E_INVALID_HANDLE,
         "lmc_store with a job, unknown engine");
  q.slot_mapping = NULL;
  EXPECT_MSG(lmc_store(&r, e, &q, &job), LMC_E_INVALID_ARGUMENT, "slot_mapping",
             "lmc_store with a job, slot_mapping NULL");
  q.slot_mapping = slots;
  q.first_token = NTOK + 1;
  EXPECT_MSG(lmc_retrieve(&r, e, &q, &job), LMC_E_INVALID_ARGUMENT, "first_token",
             "lmc_retrieve with a job, first_token > num_tokens");
  q.first_token = 0;
  EXPECT_MSG(lmc_store(&r, e, NULL, &job), LMC_E_INVALID_ARGUMENT, "request",
             "lmc_store with a job, request NULL");
  {
    int32_t bad_blocks[6] = {6, 0, -2, 1, 4, 2};
    lmc_request qb = req_table(tokens, NTOK, bad_blocks, 6, BS, 0, "a");
    EXPECT_MSG(lmc_retrieve(&r, e, &qb, &job), LMC_E_INVALID_ARGUMENT, "block",
               "lmc_retrieve with a job, block id -2");
    bad_blocks[2] = NB;
    EXPECT(lmc_store(&r, e, &qb, &job), LMC_E_INVALID_ARGUMENT,
           "lmc_store with a job, block id 8 (past the cache)");
  }
  report(job == SENTINEL_JOB && tr_is_blank(&r),
         "failed calls with job_out leave job_out and result_out untouched");

  /* A store job; the request's buffers are scribbled over as soon as the call returned. */
  memcpy(scratch_tok, tokens, sizeof tokens);
  memcpy(scratch_slots, slots, sizeof slots);
  q = req_slots(scratch_tok, NTOK, scratch_slots, 0, "a");
  q.stream = stream;
  untouched = tr_blank();
  job = NULL;
  if (EXPECT(lmc_store(&untouched, e, &q, &job), LMC_OK,
             "lmc_store with a job, host layers, stream ignored")) {
    memset(scratch_tok, 0x5a, sizeof scratch_tok);
    memset(scratch_slots, 0xff, sizeof scratch_slots); /* -1 everywhere */
    report(job != NULL && job != SENTINEL_JOB, "lmc_store returns a job");
    report(tr_is_blank(&untouched), "lmc_store with job_out does not write result_out");
    report(poll_until_finished(job, 10000), "lmc_job_poll reports the store job finished (within 10 s)");
    finished = -1;
    EXPECT(lmc_job_poll(&finished, job), LMC_OK, "lmc_job_poll on the finished store job");
    report(finished == 1, "lmc_job_poll finished_out = %d (want 1)", (int)finished);
    r = tr_blank();
    EXPECT(lmc_job_result(&r, job), LMC_OK, "lmc_job_result(store job)");
    check_tr(&r, NTOK, NTOK, 0, TB, "store job result");
    sync = expect_store(twin, tokens, slots, NTOK, 0, "a", NTOK, "the same store, synchronous (twin)");
    report(tr_same_work(&r, &sync), "store job result %s == synchronous result %s", tr_str(&r),
           tr_str(&sync));
    r = tr_blank();
    EXPECT(lmc_job_wait(&r, job, 0), LMC_OK, "lmc_job_wait(store job, 0): finished");
    report(tr_same_work(&r, &sync), "lmc_job_wait(0) gives the same result again");
    r = tr_blank();
    EXPECT(lmc_job_wait(&r, job, (int64_t)1 << 40), LMC_OK,
           "lmc_job_wait(store job, 2^40 ms): a bound beyond 32 bits is valid");
    report(tr_same_work(&r, &sync), "lmc_job_wait(2^40) gives the same result");
    r = tr_blank();
    r.struct_size = 0;
    EXPECT_MSG(lmc_job_wait(&r, job, 0), LMC_E_INVALID_ARGUMENT, "struct_size",
               "lmc_job_wait with result struct_size 0");
    {
      /* A result struct of an older caller: nothing written past struct_size. */
      unsigned char *p = (unsigned char *)&r;
      size_t k;
      int untouched = 1;
      lmc_status s;
      r = tr_blank();
      r.struct_size = 16;
      s = lmc_job_wait(&r, job, 0);
      for (k = 16; k < sizeof r; k++)
        if (p[k] != 0xAB) untouched = 0;
      report((s == LMC_OK || s == LMC_E_INVALID_ARGUMENT) && untouched &&
                 (s != LMC_OK || r.tokens_matched == NTOK),
             "lmc_job_wait with result struct_size 16 -> %s, nothing written past byte 16%s",
             sname(s), untouched ? "" : " [bytes past 16 were written]");
    }
    lmc_job_destroy(job);
  }
  expect_lookup(e, tokens, NTOK, "a", NTOK, "after the store job (the scribbled buffers did not matter)");

  /* A retrieve job through a block table from token 3, with result_out NULL. */
  kv_fill(&dst, GUARD_VALUE);
  kv_copy(&expect, &dst);
  apply_retrieve(&expect, &src, slots, table_slots, 3, NTOK, MAXL);
  EXPECT(kv_register(e, &dst, MAXL), LMC_OK, "register the destination layers");
  kv_fill(&dst2, GUARD_VALUE);
  EXPECT(kv_register(twin, &dst2, MAXL), LMC_OK, "register the twin's destination layers");
  memcpy(scratch_tok, tokens, sizeof tokens);
  memcpy(scratch_blocks, blocks, sizeof blocks);
  q = req_table(scratch_tok, NTOK, scratch_blocks, 6, BS, 3, "a");
  job = NULL;
  if (EXPECT(lmc_retrieve(NULL, e, &q, &job), LMC_OK,
             "lmc_retrieve with a job (block table, first_token 3, result_out NULL)")) {
    memset(scratch_tok, 0x5a, sizeof scratch_tok);
    memset(scratch_blocks, 0xff, sizeof scratch_blocks);
    r = tr_blank();
    EXPECT(lmc_job_wait(&r, job, -1), LMC_OK, "lmc_job_wait(retrieve job, -1)");
    check_tr(&r, NTOK, NTOK - 3, NTOK / CHUNK, TB, "retrieve job result");
    where[0] = '\0';
    ok = kv_equal(&dst, &expect, where, sizeof where);
    report(ok, "the retrieve job wrote exactly tokens [3, %d) into the table's slots, guards intact%s%s",
           NTOK, ok ? "" : ": ", where);
    q = req_table(tokens, NTOK, blocks, 6, BS, 3, "a");
    sync = tr_blank();
    EXPECT(lmc_retrieve(&sync, twin, &q, NULL), LMC_OK, "the same retrieve, synchronous (twin)");
    report(tr_same_work(&r, &sync), "retrieve job result %s == synchronous result %s", tr_str(&r),
           tr_str(&sync));
    where[0] = '\0';
    ok = kv_equal(&dst2, &dst, where, sizeof where);
    report(ok, "the job and the synchronous retrieve wrote the same bytes%s%s", ok ? "" : ": ", where);
    r = tr_blank();
    EXPECT(lmc_job_result(&r, job), LMC_OK, "lmc_job_result(retrieve job)");
    report(tr_same_work(&r, &sync), "lmc_job_result gives the same result as lmc_job_wait");
    lmc_job_destroy(job);
    EXPECT(lmc_job_wait(&r, job, 0), LMC_E_INVALID_HANDLE, "lmc_job_wait on a destroyed job");
    finished = -7;
    EXPECT(lmc_job_poll(&finished, job), LMC_E_INVALID_HANDLE, "lmc_job_poll on a destroyed job");
    report(finished == -7, "lmc_job_poll on a destroyed job leaves finished_out untouched");
    EXPECT(lmc_job_result(&r, job), LMC_E_INVALID_HANDLE, "lmc_job_result on a destroyed job");
    lmc_job_destroy(job);
    capture_message();
    report(g_msg[0] != '\0', "lmc_job_destroy twice is a no-op that says why (\"%.100s\")", g_msg);
  }
  /* A retrieve job of a miss. */
  {
    int32_t other[NTOK];
    make_tokens(other, NTOK, 22);
    q = req_slots(other, NTOK, slots, 0, NULL);
    job = NULL;
    if (EXPECT(lmc_retrieve(NULL, e, &q, &job), LMC_OK, "lmc_retrieve with a job, a miss")) {
      r = tr_blank();
      EXPECT(lmc_job_wait(&r, job, -1), LMC_OK, "lmc_job_wait(retrieve job of a miss)");
      check_tr(&r, 0, 0, 0, TB, "retrieve job of a miss");
      lmc_job_destroy(job);
    }
  }
  if (get_stats(e, &st))
    report(st.store_requests == 1 && st.retrieve_requests == 2 && st.stored_tokens == NTOK &&
               st.retrieved_tokens == NTOK,
           "jobs are counted like the synchronous calls (stores %llu (1), retrieves %llu (2), "
           "stored tokens %llu (%d), retrieved tokens %llu (%d))",
           (unsigned long long)st.store_requests, (unsigned long long)st.retrieve_requests,
           (unsigned long long)st.stored_tokens, NTOK, (unsigned long long)st.retrieved_tokens, NTOK);

  /* Many jobs at once, collected with lmc_job_poll (vLLM's get_finished). */
  {
    enum { NJOBS = 16 };
    lmc_job *jobs[NJOBS];
    int32_t toks[NJOBS][NTOK];
    int i, started = 0, done = 0, bad = 0;
    int64_t end;
    EXPECT(kv_register(e, &src, MAXL), LMC_OK, "register the source again [16 jobs]");
    for (i = 0; i < NJOBS; i++) {
      make_tokens(toks[i], NTOK, 300 + i);
      q = req_slots(toks[i], NTOK, slots, 0, NULL);
      jobs[i] = NULL;
      if (lmc_store(NULL, e, &q, &jobs[i]) == LMC_OK && jobs[i]) started++;
    }
    report(started == NJOBS, "16 store jobs started (%d)", started);
    end = now_ms() + 20000;
    while (done < started && now_ms() < end) {
      done = 0;
      for (i = 0; i < started; i++) {
        int32_t f = -1;
        if (lmc_job_poll(&f, jobs[i]) != LMC_OK) bad++;
        if (f == 1) done++;
      }
      if (done < started) sleep_ms(1);
    }
    report(done == started && bad == 0, "lmc_job_poll saw all %d jobs finish (%d errors)", done, bad);
    for (i = 0; i < started; i++) {
      r = tr_blank();
      if (lmc_job_result(&r, jobs[i]) != LMC_OK || r.tokens_matched != NTOK ||
          r.tokens_copied != NTOK)
        bad++;
      lmc_job_destroy(jobs[i]);
    }
    for (i = 0; i < started; i++) {
      lmc_status s;
      if (lookup_n(e, toks[i], NTOK, NULL, &s) != NTOK) bad++;
    }
    report(bad == 0, "16 jobs: each result matched %d and copied %d, each request found by lookup "
           "(%d bad)", NTOK, NTOK, bad);
  }

  /* A store job destroyed at once still completes (its chunks appear). */
  {
    int32_t late[NTOK];
    int64_t end, hit = 0;
    make_tokens(late, NTOK, 500);
    q = req_slots(late, NTOK, slots, 0, NULL);
    job = NULL;
    if (EXPECT(lmc_store(NULL, e, &q, &job), LMC_OK, "a store job destroyed at once")) {
      lmc_job_destroy(job);
      end = now_ms() + 10000;
      do {
        lmc_status s;
        hit = lookup_n(e, late, NTOK, NULL, &s);
        if (hit == NTOK) break;
        sleep_ms(2);
      } while (now_ms() < end);
      report(hit == NTOK, "the destroyed store job still stored its chunks (lookup %lld, want %d)",
             (long long)hit, NTOK);
    }
  }

  lmc_engine_destroy(e);
  lmc_engine_destroy(twin);
  kv_free(&src);
  kv_free(&dst);
  kv_free(&dst2);
  kv_free(&expect);
}

/* ---------------------------------------------------------------------------------------------- */
/* Prefetch jobs and the argument checks of the job functions                                      */
/* ---------------------------------------------------------------------------------------------- */

static void test_prefetch_and_job_args(void) {
  lmc_engine *e = create_engine("{\"chunk_size\": 8, \"max_local_cpu_size\": 0.01}", "prefetch");
  kvbuf src;
  int32_t tok[NTOK], miss[NTOK];
  int64_t slots[NTOK];
  lmc_job *job = SENTINEL_JOB;
  lmc_transfer_result r;
  lmc_request q;
  lmc_status s;
  int32_t finished;
  if (!e) return;
  kv_alloc(&src);
  kv_pattern(&src, 4);
  make_tokens(tok, NTOK, 40);
  make_tokens(miss, NTOK, 41);
  make_slots(slots, NTOK, 5, 0);
  EXPECT(kv_register(e, &src, MAXL), LMC_OK, "register_layers [prefetch]");
  expect_store(e, tok, slots, 16, 0, NULL, 16, "two chunks [prefetch]");

  q = req_tokens(tok, NTOK, NULL);
  EXPECT_MSG(lmc_prefetch_start(NULL, e, &q), LMC_E_INVALID_ARGUMENT, "job_out",
             "lmc_prefetch_start(job_out NULL)");
  EXPECT(lmc_prefetch_start(&job, NULL, &q), LMC_E_INVALID_HANDLE, "lmc_prefetch_start(engine NULL)");
  EXPECT_MSG(lmc_prefetch_start(&job, e, NULL), LMC_E_INVALID_ARGUMENT, "request",
             "lmc_prefetch_start(request NULL)");
  q = req_tokens(NULL, NTOK, NULL);
  EXPECT_MSG(lmc_prefetch_start(&job, e, &q), LMC_E_INVALID_ARGUMENT, "tokens",
             "lmc_prefetch_start(tokens NULL, num_tokens 24)");
  q = req_tokens(tok, NTOK, NULL);
  q.first_token = 1;
  EXPECT_MSG(lmc_prefetch_start(&job, e, &q), LMC_E_INVALID_ARGUMENT, "first_token",
             "lmc_prefetch_start(first_token 1: must be 0)");
  q = req_tokens(tok, NTOK, NULL);
  q.struct_size = 0;
  EXPECT_MSG(lmc_prefetch_start(&job, e, &q), LMC_E_INVALID_ARGUMENT, "struct_size",
             "lmc_prefetch_start(request struct_size 0)");
  report(job == SENTINEL_JOB, "failed lmc_prefetch_start calls leave job_out untouched");

  /* The destination of a prefetch is ignored. */
  q = req_table(tok, NTOK, NULL, 0, 0, 0, NULL);
  job = NULL;
  s = lmc_prefetch_start(&job, e, &q);
  EXPECT(s, LMC_OK, "lmc_prefetch_start of 3 chunks, 2 cached (destination: an empty block table)");
  if (s == LMC_OK) {
    r = tr_blank();
    EXPECT(lmc_job_wait(&r, job, -1), LMC_OK, "lmc_job_wait(prefetch job, -1)");
    check_tr(&r, 16, ANY, 2, TB, "prefetch of a request whose first 2 chunks are in the CPU tier");
    report(r.chunks_by_tier[1] == 0 && r.chunks_by_tier[2] == 0 && r.chunks_by_tier[3] == 0,
           "prefetch without lower tiers: nothing from tiers 1..3");
    finished = -1;
    EXPECT(lmc_job_poll(&finished, job), LMC_OK, "lmc_job_poll(prefetch job)");
    report(finished == 1, "lmc_job_poll after lmc_job_wait returned: finished_out %d (want 1)",
           (int)finished);

    /* Argument checks of the job functions on a live job. */
    EXPECT_MSG(lmc_job_wait(NULL, job, 0), LMC_E_INVALID_ARGUMENT, "result_out",
               "lmc_job_wait(result_out NULL)");
    EXPECT_MSG(lmc_job_wait(&r, job, -5), LMC_E_INVALID_ARGUMENT, "timeout_ms",
               "lmc_job_wait(timeout_ms -5)");
    EXPECT_MSG(lmc_job_poll(NULL, job), LMC_E_INVALID_ARGUMENT, "finished_out",
               "lmc_job_poll(finished_out NULL)");
    EXPECT_MSG(lmc_job_result(NULL, job), LMC_E_INVALID_ARGUMENT, "result_out",
               "lmc_job_result(result_out NULL)");
    r = tr_blank();
    r.struct_size = 4;
    EXPECT_MSG(lmc_job_result(&r, job), LMC_E_INVALID_ARGUMENT, "struct_size",
               "lmc_job_result(result struct_size 4)");
    r = tr_blank();
    EXPECT(lmc_job_result(&r, job), LMC_OK, "lmc_job_result(prefetch job) after the failed calls");
    report(r.tokens_matched == 16, "the job still has its result (matched %lld, want 16)",
           (long long)r.tokens_matched);
    lmc_job_destroy(job);
  }
  finished = -7;
  r = tr_blank();
  EXPECT(lmc_job_wait(&r, NULL, 0), LMC_E_INVALID_HANDLE, "lmc_job_wait(job NULL)");
  EXPECT(lmc_job_poll(&finished, NULL), LMC_E_INVALID_HANDLE, "lmc_job_poll(job NULL)");
  EXPECT(lmc_job_result(&r, NULL), LMC_E_INVALID_HANDLE, "lmc_job_result(job NULL)");
  EXPECT(lmc_job_poll(&finished, SENTINEL_JOB), LMC_E_INVALID_HANDLE, "lmc_job_poll(unknown job)");
  report(finished == -7 && tr_is_blank(&r), "failed job calls leave their out-parameters untouched");
  lmc_job_destroy(NULL);
  report(1, "lmc_job_destroy(NULL) is a no-op");

  /* A prefetch of a miss; a prefetch's tokens_matched equals the lookup's hit. */
  q = req_tokens(miss, NTOK, NULL);
  job = NULL;
  if (EXPECT(lmc_prefetch_start(&job, e, &q), LMC_OK, "lmc_prefetch_start of a miss")) {
    r = tr_blank();
    EXPECT(lmc_job_wait(&r, job, -1), LMC_OK, "lmc_job_wait(prefetch of a miss)");
    check_tr(&r, 0, ANY, 0, TB, "prefetch of a miss");
    lmc_job_destroy(job);
  }
  lmc_engine_destroy(e);
  kv_free(&src);
}

/* ---------------------------------------------------------------------------------------------- */
/* Wrong-kind handles                                                                              */
/* ---------------------------------------------------------------------------------------------- */

static void test_wrong_kind(void) {
  lmc_engine *e = create_engine("{\"chunk_size\": 8}", "wrong-kind handles");
  kvbuf src;
  int32_t tok[NTOK];
  int64_t slots[NTOK], needed = SENTINEL_I64;
  lmc_job *job = NULL;
  lmc_engine *as_engine;
  lmc_job *as_job;
  lmc_transfer_result r, first;
  lmc_lookup_result lr = lr_blank();
  lmc_request q;
  lmc_stats st;
  int32_t finished = -7, count = -7;
  if (!e) return;
  kv_alloc(&src);
  kv_pattern(&src, 9);
  make_tokens(tok, NTOK, 60);
  make_slots(slots, NTOK, 3, 1);
  EXPECT(kv_register(e, &src, MAXL), LMC_OK, "register_layers [wrong kind]");
  q = req_slots(tok, NTOK, slots, 0, NULL);
  if (!EXPECT(lmc_store(NULL, e, &q, &job), LMC_OK, "a store job [wrong kind]")) goto done;
  first = tr_blank();
  EXPECT(lmc_job_wait(&first, job, -1), LMC_OK, "wait for the store job [wrong kind]");

  /* The job where an engine is expected. */
  as_engine = (lmc_engine *)(void *)job;
  r = tr_blank();
  memset(&st, 0, sizeof st);
  st.struct_size = (uint32_t)sizeof st;
  EXPECT(lmc_engine_get_stats(as_engine, &st), LMC_E_INVALID_HANDLE, "a job given to lmc_engine_get_stats");
  EXPECT(lmc_lookup(&lr, as_engine, &q), LMC_E_INVALID_HANDLE, "a job given to lmc_lookup");
  EXPECT(lmc_store(&r, as_engine, &q, NULL), LMC_E_INVALID_HANDLE, "a job given to lmc_store");
  EXPECT(lmc_retrieve(&r, as_engine, &q, NULL), LMC_E_INVALID_HANDLE, "a job given to lmc_retrieve");
  EXPECT(lmc_engine_clear(as_engine), LMC_E_INVALID_HANDLE, "a job given to lmc_engine_clear");
  EXPECT(lmc_engine_get_config(&needed, as_engine, NULL, 0), LMC_E_INVALID_HANDLE,
         "a job given to lmc_engine_get_config");
  EXPECT(lmc_engine_tier_count(&count, as_engine), LMC_E_INVALID_HANDLE,
         "a job given to lmc_engine_tier_count");
  EXPECT(lmc_engine_flush(as_engine, 0), LMC_E_INVALID_HANDLE, "a job given to lmc_engine_flush");
  EXPECT(lmc_lookup_server_stop(as_engine), LMC_E_INVALID_HANDLE,
         "a job given to lmc_lookup_server_stop");
  lmc_engine_destroy(as_engine);
  capture_message();
  report(g_msg[0] != '\0', "lmc_engine_destroy(a job) is a no-op that says why (\"%.120s\")", g_msg);
  report(tr_is_blank(&r) && lr_is_blank(&lr) && needed == SENTINEL_I64 && count == -7,
         "the wrong-kind calls left their out-parameters untouched");
  r = tr_blank();
  EXPECT(lmc_job_wait(&r, job, 0), LMC_OK, "the job still works after being given to engine functions");
  report(tr_same_work(&r, &first), "the job's result is unchanged: %s", tr_str(&r));

  /* The engine where a job is expected. */
  as_job = (lmc_job *)(void *)e;
  r = tr_blank();
  EXPECT(lmc_job_wait(&r, as_job, 0), LMC_E_INVALID_HANDLE, "an engine given to lmc_job_wait");
  EXPECT(lmc_job_poll(&finished, as_job), LMC_E_INVALID_HANDLE, "an engine given to lmc_job_poll");
  EXPECT(lmc_job_result(&r, as_job), LMC_E_INVALID_HANDLE, "an engine given to lmc_job_result");
  lmc_job_destroy(as_job);
  capture_message();
  report(g_msg[0] != '\0', "lmc_job_destroy(an engine) is a no-op that says why (\"%.120s\")", g_msg);
  report(tr_is_blank(&r) && finished == -7, "the wrong-kind job calls left their out-parameters untouched");
  expect_lookup(e, tok, NTOK, NULL, NTOK, "the engine still works after being given to job functions");
  EXPECT(lmc_engine_clear(e), LMC_OK, "lmc_engine_clear on the engine [wrong kind]");
  expect_store(e, tok, slots, NTOK, 0, NULL, NTOK, "store again after clear [wrong kind]");
  lmc_job_destroy(job);
done:
  lmc_engine_destroy(e);
  kv_free(&src);
}

/* ---------------------------------------------------------------------------------------------- */
/* Jobs that are still running                                                                     */
/* ---------------------------------------------------------------------------------------------- */

/* A TCP server that accepts connections (the kernel does) and never answers: a hung Redis. */
static int hung_server(int *port_out) {
  struct sockaddr_in addr;
  socklen_t len = sizeof addr;
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  memset(&addr, 0, sizeof addr);
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, 64) != 0 ||
      getsockname(fd, (struct sockaddr *)&addr, &len) != 0) {
    close(fd);
    return -1;
  }
  *port_out = ntohs(addr.sin_port);
  return fd;
}

static void test_running_jobs(void) {
  char config[256];
  int port = 0, fd = hung_server(&port);
  lmc_engine *e1, *e2, *e3;
  kvbuf src;
  int32_t tok[NTOK];
  int64_t slots[NTOK], t0, t1;
  lmc_job *job1 = NULL, *job2 = NULL, *job3 = NULL;
  lmc_transfer_result r;
  lmc_request q;
  lmc_stats st;
  int32_t finished;
  lmc_status s;
  if (fd < 0) {
    report(0, "a local TCP listener for the hung remote tier");
    return;
  }
  snprintf(config, sizeof config,
           "{\"chunk_size\": 8, \"remote_url\": \"redis://127.0.0.1:%d/0\", "
           "\"blocking_timeout_secs\": 3}",
           port);
  note("a remote tier at 127.0.0.1:%d that never answers: its first read waits up to 3 s", port);
  e1 = create_engine(config, "running jobs #1");
  e2 = create_engine(config, "running jobs #2");
  e3 = create_engine(config, "running jobs #3");
  kv_alloc(&src);
  kv_fill(&src, GUARD_VALUE);
  make_tokens(tok, NTOK, 70);
  make_slots(slots, NTOK, 5, 1);
  if (!e1 || !e2 || !e3 || kv_register(e1, &src, MAXL) != LMC_OK ||
      kv_register(e2, &src, MAXL) != LMC_OK || kv_register(e3, &src, MAXL) != LMC_OK) {
    report(0, "three engines with the hung remote tier and host layers: %s", lmc_last_error_message());
    goto done;
  }
  t0 = now_ms();
  q = req_tokens(tok, NTOK, NULL);
  s = lmc_prefetch_start(&job1, e1, &q);
  EXPECT(s, LMC_OK, "lmc_prefetch_start on engine #1 (the remote tier will hang)");
  q = req_slots(tok, NTOK, slots, 0, NULL);
  EXPECT(lmc_retrieve(NULL, e2, &q, &job2), LMC_OK, "lmc_retrieve with a job on engine #2 (a miss: asks the remote)");
  EXPECT(lmc_retrieve(NULL, e3, &q, &job3), LMC_OK, "lmc_retrieve with a job on engine #3 (a miss: asks the remote)");
  t1 = now_ms();
  report(t1 - t0 < 1000, "starting three jobs does not wait for the remote tier (%lld ms)",
         (long long)(t1 - t0));
  if (!job1 || !job2 || !job3) goto done;

  finished = -1;
  EXPECT(lmc_job_poll(&finished, job1), LMC_OK, "lmc_job_poll(running prefetch)");
  report(finished == 0, "lmc_job_poll of the running prefetch: finished_out %d (want 0)", (int)finished);
  if (finished != 0)
    note("the prefetch was not held up by the hung remote tier; the running-job checks below are "
         "not meaningful");
  r = tr_blank();
  EXPECT(lmc_job_result(&r, job1), LMC_E_TIMEOUT, "lmc_job_result(running prefetch)");
  report(tr_is_blank(&r), "lmc_job_result of a running job leaves result_out untouched");
  t0 = now_ms();
  EXPECT(lmc_job_wait(&r, job1, 0), LMC_E_TIMEOUT, "lmc_job_wait(running prefetch, 0)");
  EXPECT(lmc_job_wait(&r, job1, 100), LMC_E_TIMEOUT, "lmc_job_wait(running prefetch, 100 ms)");
  t1 = now_ms();
  report(t1 - t0 >= 90 && tr_is_blank(&r),
         "lmc_job_wait(100 ms) waited %lld ms and left result_out untouched", (long long)(t1 - t0));

  /* Wrong kind while it runs. */
  memset(&st, 0, sizeof st);
  st.struct_size = (uint32_t)sizeof st;
  EXPECT(lmc_engine_get_stats((lmc_engine *)(void *)job1, &st), LMC_E_INVALID_HANDLE,
         "a running job given to lmc_engine_get_stats");
  lmc_engine_destroy((lmc_engine *)(void *)job1);
  EXPECT(lmc_job_poll(&finished, job1), LMC_OK,
         "the running job is still a job after lmc_engine_destroy(job) was refused");
  EXPECT(lmc_job_wait(&r, (lmc_job *)(void *)e1, 0), LMC_E_INVALID_HANDLE,
         "an engine with a running job given to lmc_job_wait");
  lmc_job_destroy((lmc_job *)(void *)e1);
  EXPECT(lmc_engine_get_stats(e1, &st), LMC_OK,
         "engine #1 still works after lmc_job_destroy(engine) was refused");

  /* Destroy job #2 while it runs; destroy engine #3 while its job runs. */
  lmc_job_destroy(job2);
  EXPECT(lmc_job_poll(&finished, job2), LMC_E_INVALID_HANDLE, "lmc_job_poll of a job destroyed while running");
  t0 = now_ms();
  lmc_engine_destroy(e3);
  e3 = NULL;
  t1 = now_ms();
  note("lmc_engine_destroy(engine #3) with a running job returned after %lld ms", (long long)(t1 - t0));
  finished = -1;
  s = lmc_job_poll(&finished, job3);
  EXPECT(s, LMC_OK, "lmc_job_poll of a job whose engine was destroyed (the handle is still valid)");
  report(finished == 1, "destroying the engine waited for its job: finished_out %d (want 1)",
         (int)finished);
  r = tr_blank();
  s = lmc_job_wait(&r, job3, 5000);
  capture_message();
  report(s != LMC_E_TIMEOUT && s != LMC_E_INVALID_HANDLE,
         "lmc_job_wait of that job gives its outcome: %s %s \"%.150s\"", sname(s),
         s == LMC_OK ? tr_str(&r) : "", g_msg);
  lmc_job_destroy(job3);

  /* Job #1 finishes when the remote tier gives up: a miss, not an error. */
  r = tr_blank();
  t0 = now_ms();
  EXPECT(lmc_job_wait(&r, job1, 20000), LMC_OK, "lmc_job_wait(prefetch, 20 s) once the remote tier gives up");
  check_tr(&r, 0, ANY, 0, TB, "prefetch with a hung remote tier (a miss)");
  finished = -1;
  EXPECT(lmc_job_poll(&finished, job1), LMC_OK, "lmc_job_poll(finished prefetch)");
  report(finished == 1, "lmc_job_poll of the finished prefetch: finished_out %d (want 1)", (int)finished);
  lmc_job_destroy(job1);
done:
  lmc_engine_destroy(e1);
  lmc_engine_destroy(e2);
  lmc_engine_destroy(e3);
  kv_free(&src);
  close(fd);
}

int main(void) {
  harness_init();
  test_transfer_jobs();
  test_prefetch_and_job_args();
  test_wrong_kind();
  test_running_jobs();
  return harness_finish("jobs");
}
