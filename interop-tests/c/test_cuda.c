/*
 * test_cuda.c — the CUDA entry points without relying on a GPU: lmc_cuda_device_count and CUDA
 * layer registration are refused cleanly (LMC_E_NO_DEVICE) on a machine without a usable GPU, and
 * the host path of the same engine keeps working.
 *
 * `test_cuda --probe no-driver` runs with LMC_CUDA_LIBRARY=/nonexistent: the machine without
 * libcuda.so.1 (the driver is looked up once per process, hence a child process).
 */
#include "harness.h"

#include <sys/stat.h>

extern char **environ;

/* Without a GPU (no libcuda.so.1, or cuInit failing: what a CI machine with the CUDA toolkit has)
 * the answer is LMC_E_NO_DEVICE with a message saying which; with a GPU, host pointers posing as
 * device memory are refused by the driver check as invalid. */
static void test_cuda_layers(void) {
  lmc_engine *e = create_engine("{\"chunk_size\": 8}", "CUDA layers");
  lmc_kv_layer_desc d[2];
  struct stat sb;
  int have_gpu = stat("/dev/nvidia0", &sb) == 0;
  int32_t count = -7;
  lmc_status s;
  if (!e) return;
  note("/dev/nvidia0 %s", have_gpu ? "exists: checking the GPU answers" : "is absent: checking the no-GPU answers");

  s = lmc_cuda_device_count(&count);
  capture_message();
  if (have_gpu)
    report(s == LMC_OK && count >= 1 && g_msg[0] == '\0',
           "lmc_cuda_device_count (GPU present) -> %s, %d device(s)", sname(s), (int)count);
  else
    report(s == LMC_E_NO_DEVICE && count == -7 && g_msg[0] != '\0',
           "lmc_cuda_device_count, no GPU -> %s, count_out untouched (\"%.200s\")", sname(s), g_msg);
  EXPECT_MSG(lmc_cuda_device_count(NULL), LMC_E_INVALID_ARGUMENT, "count_out",
             "lmc_cuda_device_count(NULL)");

  d[0] = nhd_desc((void *)(uintptr_t)0x7f0000000000ull);
  d[1] = nhd_desc((void *)(uintptr_t)(0x7f0000000000ull + LAYER_BYTES));
  d[0].device_kind = d[1].device_kind = LMC_DEVICE_CUDA;
  s = lmc_engine_register_layers(e, d, 2);
  capture_message();
  if (have_gpu)
    report(s == LMC_E_INVALID_ARGUMENT && g_msg[0] != '\0',
           "register_layers with CUDA layers at non-device addresses (GPU present) -> %s \"%.200s\"",
           sname(s), g_msg);
  else
    report(s == LMC_E_NO_DEVICE && g_msg[0] != '\0',
           "register_layers with CUDA layers, no GPU -> %s (want LMC_E_NO_DEVICE) \"%.200s\"",
           sname(s), g_msg);
  d[0].device_index = d[1].device_index = -1;
  s = lmc_engine_register_layers(e, d, 2);
  capture_message();
  report(s == LMC_E_INVALID_ARGUMENT && contains_ci(g_msg, "device_index"),
         "register_layers with CUDA device_index -1 -> %s \"%.200s\"", sname(s), g_msg);
  d[0].device_index = 0;
  d[1].device_index = 1;
  s = lmc_engine_register_layers(e, d, 2);
  capture_message();
  report(s != LMC_OK && g_msg[0] != '\0',
         "register_layers with CUDA layers on two devices -> %s \"%.200s\"", sname(s), g_msg);
  {
    /* The refused registrations left the engine without layers. */
    lmc_lookup_result r = lr_blank();
    lmc_request q = req_tokens(NULL, 0, NULL);
    EXPECT(lmc_lookup(&r, e, &q), LMC_E_INVALID_ARGUMENT,
           "lookup after the refused CUDA registrations still needs layers");
  }
  lmc_engine_destroy(e);
}

/* Child process with LMC_CUDA_LIBRARY=/nonexistent: the machine without libcuda.so.1. */
static int probe_no_driver(void) {
  kvbuf src, dst, expect;
  lmc_engine *e = NULL;
  lmc_kv_layer_desc d[MAXL];
  int32_t tokens[NTOK], count = -7;
  int64_t slots[NTOK];
  lmc_transfer_result r;
  lmc_request q;
  lmc_job *job = NULL;
  int bad = 0, l;
  lmc_status s;
  char where[200];

  s = lmc_cuda_device_count(&count);
  if (s != LMC_E_NO_DEVICE || count != -7 || !contains_ci(lmc_last_error_message(), "/nonexistent")) {
    fprintf(stderr, "# device_count: %d \"%s\"\n", (int)s, lmc_last_error_message());
    bad++;
  }
  if (lmc_engine_create(&e, "{\"chunk_size\": 8}", "no-driver", 1, 0) != LMC_OK) return 3;
  kv_alloc(&src);
  kv_alloc(&dst);
  kv_alloc(&expect);
  kv_pattern(&src, 11);
  for (l = 0; l < MAXL; l++) {
    d[l] = nhd_desc(kv_base(&src, l));
    d[l].device_kind = LMC_DEVICE_CUDA;
  }
  s = lmc_engine_register_layers(e, d, MAXL);
  if (s != LMC_E_NO_DEVICE || !contains_ci(lmc_last_error_message(), "could not be loaded")) {
    fprintf(stderr, "# register CUDA: %d \"%s\"\n", (int)s, lmc_last_error_message());
    bad++;
  }
  /* The host path of the same engine works, synchronously and with a job and a (ignored) stream. */
  make_tokens(tokens, NTOK, 5);
  make_slots(slots, NTOK, 5, 3);
  q = req_slots(tokens, NTOK, slots, 0, NULL);
  q.stream = (void *)(uintptr_t)0x42;
  r = tr_blank();
  if (kv_register(e, &src, MAXL) != LMC_OK || lmc_store(NULL, e, &q, &job) != LMC_OK ||
      lmc_job_wait(&r, job, -1) != LMC_OK || r.tokens_matched != NTOK) {
    fprintf(stderr, "# host store job: \"%s\" %s\n", lmc_last_error_message(), tr_str(&r));
    bad++;
  }
  lmc_job_destroy(job);
  kv_fill(&dst, GUARD_VALUE);
  kv_copy(&expect, &dst);
  apply_retrieve(&expect, &src, slots, slots, 0, NTOK, MAXL);
  r = tr_blank();
  if (kv_register(e, &dst, MAXL) != LMC_OK || lmc_retrieve(&r, e, &q, NULL) != LMC_OK ||
      r.tokens_matched != NTOK || !kv_equal(&dst, &expect, where, sizeof where)) {
    fprintf(stderr, "# host retrieve: \"%s\" %s\n", lmc_last_error_message(), tr_str(&r));
    bad++;
  }
  lmc_engine_destroy(e);
  kv_free(&src);
  kv_free(&dst);
  kv_free(&expect);
  return bad ? 1 : 0;
}

static void test_no_driver(void) {
  char **env;
  size_t n = 0, i, j = 0;
  while (environ[n]) n++;
  env = (char **)calloc(n + 2, sizeof *env);
  if (!env) return;
  for (i = 0; i < n; i++)
    if (strncmp(environ[i], "LMC_CUDA_LIBRARY=", 17) != 0) env[j++] = environ[i];
  env[j++] = (char *)"LMC_CUDA_LIBRARY=/nonexistent";
  env[j] = NULL;
  report_probe(spawn_probe("no-driver", NULL, env),
               "LMC_CUDA_LIBRARY=/nonexistent (no libcuda.so.1): device count and CUDA registration "
               "-> LMC_E_NO_DEVICE naming the library; host layers of the same engine store (job, "
               "stream ignored) and retrieve");
  free(env);
}

int main(int argc, char **argv) {
  if (argc >= 3 && strcmp(argv[1], "--probe") == 0) {
    if (strcmp(argv[2], "no-driver") == 0) return probe_no_driver();
    fprintf(stderr, "unknown probe %s\n", argv[2]);
    return 2;
  }
  harness_init();
  test_cuda_layers();
  test_no_driver();
  return harness_finish("cuda");
}
