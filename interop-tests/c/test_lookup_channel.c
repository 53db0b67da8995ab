/*
 * test_lookup_channel.c — lookups across processes: lmc_lookup_server_start / _stop on an engine,
 * lmc_remote_lookup from this process and from a child process with no engine.
 *
 * `test_lookup_channel --probe remote-lookup PATH` is the child side.
 */
#include "harness.h"

#include <unistd.h>

/* Child side: the tokens are the parent's (same seed). */
static int probe_remote_lookup(const char *path) {
  int32_t tok[NTOK];
  int64_t h1 = -1, h2 = -1, h3 = -1;
  lmc_status a, b, c;
  make_tokens(tok, NTOK, 12);
  a = lmc_remote_lookup(&h1, path, tok, NTOK, (const uint8_t *)"salt", 4, 2000);
  b = lmc_remote_lookup(&h2, path, tok, NTOK, NULL, 0, 2000);
  c = lmc_remote_lookup(&h3, path, tok, 12, (const uint8_t *)"salt", 4, -1);
  if (!(a == LMC_OK && h1 == 16 && b == LMC_OK && h2 == 0 && c == LMC_OK && h3 == 8)) {
    fprintf(stderr, "# remote lookups: %s %lld, %s %lld, %s %lld\n", sname(a), (long long)h1,
            sname(b), (long long)h2, sname(c), (long long)h3);
    return 1;
  }
  return 0;
}

static void test_lookup_channel(void) {
  char path[64], dir[] = "/tmp/lmcn-lookup-XXXXXX";
  lmc_engine *e = create_engine("{\"chunk_size\": 8, \"max_local_cpu_size\": 0.01}", "lookup server");
  kvbuf src;
  int32_t tok[NTOK];
  int64_t slots[NTOK], hit = SENTINEL_I64;
  lmc_status s;
  if (!e) return;
  if (!mkdtemp(dir)) {
    report(0, "mkdtemp for the lookup socket");
    lmc_engine_destroy(e);
    return;
  }
  snprintf(path, sizeof path, "%s/lookup.sock", dir);
  kv_alloc(&src);
  kv_pattern(&src, 31);
  make_tokens(tok, NTOK, 12);
  make_slots(slots, NTOK, 5, 2);
  EXPECT(kv_register(e, &src, 2), LMC_OK, "register_layers [lookup server]");
  expect_store(e, tok, slots, 16, 0, "salt", 16, "two chunks with a salt");
  EXPECT(lmc_lookup_server_start(e, path), LMC_OK, "lmc_lookup_server_start(%s)", path);
  EXPECT_MSG(lmc_lookup_server_start(e, path), LMC_E_INVALID_ARGUMENT, "already", "start twice");
  EXPECT_MSG(lmc_lookup_server_start(e, NULL), LMC_E_INVALID_ARGUMENT, "socket_path", "start(NULL)");
  EXPECT(lmc_lookup_server_start(NULL, path), LMC_E_INVALID_HANDLE, "start(engine NULL)");

  /* Ask from another process (a fresh exec of this program: no engine, no forked runtime). */
  report_probe(spawn_probe("remote-lookup", path, NULL),
               "lmc_remote_lookup from a child process: hits 16 with the salt, 0 without, 8 for 12 "
               "tokens");

  s = lmc_remote_lookup(&hit, path, tok, NTOK, (const uint8_t *)"salt", 4, 2000);
  report(s == LMC_OK && hit == 16, "lmc_remote_lookup in-process -> %s, %lld", sname(s), (long long)hit);
  {
    lmc_lookup_result r = lr_blank();
    lmc_request q = req_tokens(tok, NTOK, "salt");
    s = lmc_lookup(&r, e, &q);
    report(s == LMC_OK && r.hit_tokens == hit,
           "lmc_remote_lookup answers what lmc_lookup does (%lld == %lld)", (long long)hit,
           (long long)r.hit_tokens);
  }
  hit = SENTINEL_I64;
  EXPECT_MSG(lmc_remote_lookup(&hit, path, tok, NTOK, NULL, 0, 0), LMC_E_INVALID_ARGUMENT, "timeout_ms",
             "remote_lookup timeout 0");
  EXPECT_MSG(lmc_remote_lookup(&hit, path, tok, NTOK, NULL, 0, -2), LMC_E_INVALID_ARGUMENT, "timeout_ms",
             "remote_lookup timeout -2");
  EXPECT_MSG(lmc_remote_lookup(NULL, path, tok, NTOK, NULL, 0, 100), LMC_E_INVALID_ARGUMENT,
             "hit_tokens_out", "remote_lookup(NULL out)");
  EXPECT_MSG(lmc_remote_lookup(&hit, NULL, tok, NTOK, NULL, 0, 100), LMC_E_INVALID_ARGUMENT,
             "socket_path", "remote_lookup(NULL path)");
  EXPECT_MSG(lmc_remote_lookup(&hit, path, NULL, NTOK, NULL, 0, 100), LMC_E_INVALID_ARGUMENT, "tokens",
             "remote_lookup(NULL tokens)");
  EXPECT_MSG(lmc_remote_lookup(&hit, path, tok, NTOK, NULL, 4, 100), LMC_E_INVALID_ARGUMENT, "extra_key",
             "remote_lookup(extra_key NULL, extra_key_len 4)");
  report(hit == SENTINEL_I64, "failed remote lookups leave hit_tokens_out untouched");

  EXPECT(lmc_lookup_server_stop(e), LMC_OK, "lmc_lookup_server_stop");
  EXPECT(lmc_lookup_server_stop(e), LMC_OK, "lmc_lookup_server_stop again (no-op)");
  EXPECT(lmc_lookup_server_stop(NULL), LMC_E_INVALID_HANDLE, "lmc_lookup_server_stop(NULL)");
  report(access(path, F_OK) != 0, "the socket file is removed");
  EXPECT(lmc_remote_lookup(&hit, path, tok, NTOK, NULL, 0, 500), LMC_E_IO, "remote_lookup with no server");

  EXPECT(lmc_lookup_server_start(e, path), LMC_OK, "start again");
  lmc_engine_destroy(e);
  report(access(path, F_OK) != 0, "destroy stops the lookup server");
  EXPECT(lmc_lookup_server_start(e, path), LMC_E_INVALID_HANDLE, "destroyed handle: lookup_server_start");
  EXPECT(lmc_lookup_server_stop(e), LMC_E_INVALID_HANDLE, "destroyed handle: lookup_server_stop");
  kv_free(&src);
  rmdir(dir);
}

int main(int argc, char **argv) {
  if (argc >= 3 && strcmp(argv[1], "--probe") == 0) {
    if (argc == 4 && strcmp(argv[2], "remote-lookup") == 0) return probe_remote_lookup(argv[3]);
    fprintf(stderr, "unknown probe %s\n", argv[2]);
    return 2;
  }
  harness_init();
  test_lookup_channel();
  return harness_finish("lookup_channel");
}
