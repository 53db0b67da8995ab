/*
 * test_threads.c — the last error message is per thread; lookups on several threads while another
 * stores and retrieves; a job started on one thread and waited for on another.
 */
#include "harness.h"

#include <pthread.h>

typedef struct thread_result {
  int fresh_empty;    /* message "" on a fresh thread */
  int own_failure;    /* a failure on this thread sets this thread's message */
  int success_clears; /* then a success clears it */
} thread_result;

static lmc_engine *g_thread_engine;

static void *error_thread(void *arg) {
  thread_result *r = (thread_result *)arg;
  const char *m = lmc_last_error_message();
  lmc_engine *e = NULL;
  lmc_stats st;
  r->fresh_empty = (m != NULL && m[0] == '\0');
  r->own_failure = lmc_engine_create(&e, "{}", "m", 0, 0) == LMC_E_INVALID_ARGUMENT &&
                   (m = lmc_last_error_message()) != NULL && m[0] != '\0';
  memset(&st, 0, sizeof st);
  st.struct_size = (uint32_t)sizeof st;
  r->success_clears = lmc_engine_get_stats(g_thread_engine, &st) == LMC_OK &&
                      (m = lmc_last_error_message()) != NULL && m[0] == '\0';
  return NULL;
}

typedef struct lookup_worker {
  lmc_engine *e;
  const int32_t *tokens;
  int iterations;
  int bad; /* calls that failed or returned a wrong hit */
} lookup_worker;

static void *lookup_thread(void *arg) {
  lookup_worker *w = (lookup_worker *)arg;
  int i;
  for (i = 0; i < w->iterations; i++) {
    lmc_status s;
    if (lookup_n(w->e, w->tokens, NTOK, NULL, &s) != NTOK || s != LMC_OK) w->bad++;
  }
  return NULL;
}

typedef struct wait_worker {
  lmc_job *job;
  lmc_status status;
  lmc_transfer_result result;
} wait_worker;

static void *wait_thread(void *arg) {
  wait_worker *w = (wait_worker *)arg;
  w->result = tr_blank();
  w->status = lmc_job_wait(&w->result, w->job, -1);
  return NULL;
}

static void test_threads(void) {
  lmc_engine *e = create_engine("{\"chunk_size\": 8, \"max_local_cpu_size\": 0.05}", "threads");
  kvbuf src;
  int32_t tokA[NTOK], tok[NTOK];
  int32_t blocks[6] = {0, 1, 2, 3, 4, 5};
  int64_t slots[NTOK];
  pthread_t th[4];
  lookup_worker w[4];
  thread_result tr;
  lmc_transfer_result r;
  lmc_request q;
  char mine[2048];
  const char *m;
  int i, bad = 0;
  lmc_status s;
  if (!e) return;
  g_thread_engine = e;
  kv_alloc(&src);
  kv_pattern(&src, 3);
  make_tokens(tokA, NTOK, 77);
  make_slots(slots, NTOK, 5, 0);
  s = kv_register(e, &src, 2);
  EXPECT(s, LMC_OK, "register_layers [threads]");
  if (s != LMC_OK) goto done;
  expect_store(e, tokA, slots, NTOK, 0, NULL, NTOK, "A [threads]");

  /* The last error is per thread. */
  q = req_tokens(tokA, NTOK, NULL);
  s = lmc_lookup(NULL, e, &q);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lookup(result_out NULL) on the main thread");
  snprintf(mine, sizeof mine, "%s", g_msg);
  memset(&tr, 0, sizeof tr);
  pthread_create(&th[0], NULL, error_thread, &tr);
  pthread_join(th[0], NULL);
  report(tr.fresh_empty, "a new thread's lmc_last_error_message() is \"\"");
  report(tr.own_failure, "a failure on the new thread sets its own message");
  report(tr.success_clears, "a success on the new thread clears its message");
  m = lmc_last_error_message();
  report(m != NULL && strcmp(m, mine) == 0,
         "the main thread's message is unchanged by the other thread (\"%.100s\")", m ? m : "");

  /* Lookups on 4 threads while this thread stores and retrieves (slots and block tables). */
  for (i = 0; i < 4; i++) {
    w[i].e = e;
    w[i].tokens = tokA;
    w[i].iterations = 300;
    w[i].bad = 0;
    pthread_create(&th[i], NULL, lookup_thread, &w[i]);
  }
  for (i = 0; i < 100; i++) {
    make_tokens(tok, NTOK, 1000 + i);
    q = req_slots(tok, NTOK, slots, 0, NULL);
    r = tr_blank();
    if (lmc_store(&r, e, &q, NULL) != LMC_OK || r.tokens_matched != NTOK) bad++;
    q = (i & 1) ? req_table(tok, NTOK, blocks, 6, BS, 0, NULL) : req_slots(tok, NTOK, slots, 0, NULL);
    r = tr_blank();
    if (lmc_retrieve(&r, e, &q, NULL) != LMC_OK || r.tokens_matched != NTOK) bad++;
  }
  for (i = 0; i < 4; i++) {
    pthread_join(th[i], NULL);
    bad += w[i].bad;
  }
  report(bad == 0, "4 threads x 300 lookups during 100 stores + retrieves: %d bad results", bad);

  /* A job started here, waited for on two other threads at once. */
  {
    wait_worker ww[2];
    lmc_job *job = NULL;
    make_tokens(tok, NTOK, 5000);
    q = req_slots(tok, NTOK, slots, 0, NULL);
    if (EXPECT(lmc_store(NULL, e, &q, &job), LMC_OK, "a store job for two waiting threads")) {
      for (i = 0; i < 2; i++) {
        ww[i].job = job;
        pthread_create(&th[i], NULL, wait_thread, &ww[i]);
      }
      for (i = 0; i < 2; i++) pthread_join(th[i], NULL);
      report(ww[0].status == LMC_OK && ww[1].status == LMC_OK && ww[0].result.tokens_matched == NTOK &&
                 tr_same_work(&ww[0].result, &ww[1].result),
             "two threads waiting for one job: %s %s / %s %s", sname(ww[0].status),
             tr_str(&ww[0].result), sname(ww[1].status), tr_str(&ww[1].result));
      lmc_job_destroy(job);
    }
  }

done:
  lmc_engine_destroy(e);
  kv_free(&src);
}

int main(void) {
  harness_init();
  test_threads();
  return harness_finish("threads");
}
