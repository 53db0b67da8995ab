/*
 * smoke.c — C99 smoke test of the published liblmcache_native.so against include/lmcache_native.h.
 *
 * Calls every function of the header, with valid arguments and with NULL / invalid ones, and checks
 * the status, the thread's last error message (never NULL; "" after success; non-empty after a
 * failure, naming the offending key or field where the header promises that) and that failed calls
 * leave out-parameters, destination memory and cached data untouched. The round trip uses host
 * buffers in FlashAttention NHD layout [2, B, N, H, D] with 16-bit elements and guard regions
 * around each layer, and compares bit for bit.
 *
 * Output: one "ok - …" / "not ok - …" line per check, then "# smoke: N passed, M failed".
 * Exit status: 0 when every check passed, 1 otherwise.
 *
 * `smoke --probe foreign-handle` is run by the main program as a child process: handing the
 * library a pointer it never returned may crash a broken implementation, and a crash must cost one
 * check, not the rest of the run. `smoke --probe no-driver` runs with LMC_CUDA_LIBRARY=/nonexistent,
 * the machine without libcuda.so.1 (the driver is looked up once per process).
 */
#define _POSIX_C_SOURCE 200809L

#include "lmcache_native.h"

#include <ctype.h>
#include <pthread.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

/* ---------------------------------------------------------------------------------------------- */
/* Reporting                                                                                       */
/* ---------------------------------------------------------------------------------------------- */

static int g_passed;
static int g_failed;

static void report(int ok, const char *fmt, ...) {
  va_list ap;
  printf("%s - ", ok ? "ok" : "not ok");
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  putchar('\n');
  fflush(stdout);
  if (ok)
    g_passed++;
  else
    g_failed++;
}

/* Our own names, so that printing a result never calls into the library under test. */
static const char *sname(lmc_status s) {
  switch (s) {
  case LMC_OK: return "LMC_OK";
  case LMC_E_INVALID_ARGUMENT: return "LMC_E_INVALID_ARGUMENT";
  case LMC_E_INVALID_HANDLE: return "LMC_E_INVALID_HANDLE";
  case LMC_E_UNSUPPORTED: return "LMC_E_UNSUPPORTED";
  case LMC_E_OUT_OF_MEMORY: return "LMC_E_OUT_OF_MEMORY";
  case LMC_E_NOT_FOUND: return "LMC_E_NOT_FOUND";
  case LMC_E_IO: return "LMC_E_IO";
  case LMC_E_CUDA: return "LMC_E_CUDA";
  case LMC_E_NO_DEVICE: return "LMC_E_NO_DEVICE";
  case LMC_E_BUFFER_TOO_SMALL: return "LMC_E_BUFFER_TOO_SMALL";
  case LMC_E_INTERNAL: return "LMC_E_INTERNAL";
  case LMC_E_TIMEOUT: return "LMC_E_TIMEOUT";
  default: return "LMC_E_UNKNOWN";
  }
}

/* Case-insensitive substring search (strcasestr is a GNU extension). */
static int contains_ci(const char *hay, const char *needle) {
  size_t n = strlen(needle);
  for (; *hay; hay++) {
    size_t i = 0;
    while (i < n && hay[i] &&
           tolower((unsigned char)hay[i]) == tolower((unsigned char)needle[i]))
      i++;
    if (i == n) return 1;
  }
  return n == 0;
}

/* The last error message of this thread, copied right after the call under test: it is only
 * valid until the next lmc_* call. */
static char g_msg[2048];
static int g_msg_was_null;

static void capture_message(void) {
  const char *m = lmc_last_error_message();
  g_msg_was_null = (m == NULL);
  snprintf(g_msg, sizeof g_msg, "%s", m ? m : "");
}

/*
 * Checks the status a call just returned together with the thread's message: "" after LMC_OK,
 * non-empty after a failure, and containing `needle` (case-insensitive) when it is not NULL.
 * Must be called before any other lmc_* call. One output line. Returns 1 when everything held.
 */
static int expectf(lmc_status got, lmc_status want, const char *needle, const char *fmt, ...) {
  char what[512];
  va_list ap;
  int ok_status, ok_msg, ok_needle;
  capture_message();
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);

  ok_status = (got == want);
  ok_msg = !g_msg_was_null && (got == LMC_OK ? g_msg[0] == '\0' : g_msg[0] != '\0');
  ok_needle = (needle == NULL || got == LMC_OK || contains_ci(g_msg, needle));
  if (ok_status && ok_msg && ok_needle) {
    if (got == LMC_OK)
      report(1, "%s -> LMC_OK", what);
    else
      report(1, "%s -> %s (\"%.200s\")", what, sname(got), g_msg);
  } else {
    report(0, "%s -> %s (%d), want %s; message %s\"%.300s\"%s%s%s", what, sname(got), (int)got,
           sname(want), g_msg_was_null ? "NULL " : "", g_msg,
           !ok_msg ? (got == LMC_OK ? " [should be empty after success]"
                                    : " [should say why]")
                   : "",
           !ok_needle ? " [should name " : "", !ok_needle ? needle : "");
    if (!ok_needle) printf("#   (message does not contain \"%s\")\n", needle);
  }
  return ok_status && ok_msg && ok_needle;
}

#define EXPECT(call, want, ...) expectf((call), (want), NULL, __VA_ARGS__)
#define EXPECT_MSG(call, want, needle, ...) expectf((call), (want), (needle), __VA_ARGS__)

/* ---------------------------------------------------------------------------------------------- */
/* KV buffers: FlashAttention NHD [2, B, N, H, D], 16-bit elements, guard regions around a layer   */
/* ---------------------------------------------------------------------------------------------- */

enum {
  NB = 8,           /* blocks */
  BS = 4,           /* tokens per block */
  NH = 2,           /* kv heads */
  HD = 8,           /* head size */
  NSLOTS = NB * BS, /* 32 */
  MAXL = 2,         /* layers */
  CHUNK = 8,        /* chunk_size of the test engines */
  GUARD = 64        /* guard elements before and after each layer */
};
#define TOK_STRIDE ((int64_t)NH * HD)
#define BLOCK_STRIDE ((int64_t)BS * NH * HD)
#define KV_STRIDE ((int64_t)NB * BS * NH * HD)
#define LAYER_ELEMS ((size_t)(2 * KV_STRIDE))
#define BUF_ELEMS ((size_t)GUARD + LAYER_ELEMS + GUARD)
#define LAYER_BYTES (LAYER_ELEMS * sizeof(uint16_t))
/* KV bytes of one token over all layers: 2 layers x K,V x H x D x 2 bytes. */
#define TOKEN_BYTES ((uint64_t)MAXL * 2 * NH * HD * 2)
#define CHUNK_BYTES (TOKEN_BYTES * CHUNK)

static const uint16_t GUARD_VALUE = 0xA5A5;

typedef struct kvbuf {
  uint16_t *mem[MAXL]; /* BUF_ELEMS each; the layer starts at mem + GUARD */
} kvbuf;

static void kv_alloc(kvbuf *b) {
  int l;
  for (l = 0; l < MAXL; l++) {
    b->mem[l] = (uint16_t *)malloc(BUF_ELEMS * sizeof(uint16_t));
    if (!b->mem[l]) {
      fprintf(stderr, "out of memory\n");
      exit(2);
    }
  }
}

static void kv_free(kvbuf *b) {
  int l;
  for (l = 0; l < MAXL; l++) free(b->mem[l]);
}

static uint16_t *kv_base(const kvbuf *b, int layer) { return b->mem[layer] + GUARD; }

static void kv_fill(kvbuf *b, uint16_t v) {
  int l;
  size_t i;
  for (l = 0; l < MAXL; l++)
    for (i = 0; i < BUF_ELEMS; i++) b->mem[l][i] = v;
}

/* Distinct, seed-dependent content in every element; guards keep GUARD_VALUE. */
static void kv_pattern(kvbuf *b, unsigned seed) {
  int l;
  size_t i;
  kv_fill(b, GUARD_VALUE);
  for (l = 0; l < MAXL; l++)
    for (i = 0; i < LAYER_ELEMS; i++) {
      uint32_t x = (uint32_t)(seed * 2654435761u) ^ (uint32_t)(l * 40503u) ^ (uint32_t)(i * 977u);
      x ^= x >> 13;
      x *= 0x5bd1e995u;
      x ^= x >> 15;
      b->mem[l][GUARD + i] = (uint16_t)(x == GUARD_VALUE ? x + 1 : x);
    }
}

static void kv_copy(kvbuf *dst, const kvbuf *src) {
  int l;
  for (l = 0; l < MAXL; l++) memcpy(dst->mem[l], src->mem[l], BUF_ELEMS * sizeof(uint16_t));
}

/* Element index of (kv, slot, head, d) inside a layer, NHD. */
static size_t nhd_index(int kv, int64_t slot, int h, int d) {
  int64_t block = slot / BS, tok = slot % BS;
  return (size_t)(kv * KV_STRIDE + block * BLOCK_STRIDE + tok * TOK_STRIDE + h * HD + d);
}

/* Describes the first difference between two buffers; returns 1 when they are equal. */
static int kv_equal(const kvbuf *a, const kvbuf *b, char *where, size_t where_len) {
  int l;
  size_t i;
  for (l = 0; l < MAXL; l++)
    for (i = 0; i < BUF_ELEMS; i++)
      if (a->mem[l][i] != b->mem[l][i]) {
        if (i < GUARD)
          snprintf(where, where_len, "layer %d guard before, element %d", l, (int)i);
        else if (i >= GUARD + LAYER_ELEMS)
          snprintf(where, where_len, "layer %d guard after, element %d", l,
                   (int)(i - GUARD - LAYER_ELEMS));
        else {
          size_t e = i - GUARD;
          int kv = (int)(e / KV_STRIDE);
          int64_t slot = (int64_t)((e % KV_STRIDE) / TOK_STRIDE);
          int h = (int)((e % TOK_STRIDE) / HD), d = (int)(e % HD);
          snprintf(where, where_len, "layer %d kv %d slot %d head %d d %d", l, kv, (int)slot, h,
                   d);
        }
        snprintf(where + strlen(where), where_len - strlen(where), ": got 0x%04x, want 0x%04x",
                 a->mem[l][i], b->mem[l][i]);
        return 0;
      }
  return 1;
}

/* Applies to `expect` what a retrieve of tokens [first, retrieved) should have written. */
static void apply_retrieve(kvbuf *expect, const kvbuf *src, const int64_t *src_slots,
                           const int64_t *dst_slots, int64_t first, int64_t retrieved,
                           int nlayers) {
  int64_t t;
  int l, kv, h, d;
  for (t = first; t < retrieved; t++) {
    if (dst_slots[t] == -1) continue;
    for (l = 0; l < nlayers; l++)
      for (kv = 0; kv < 2; kv++)
        for (h = 0; h < NH; h++)
          for (d = 0; d < HD; d++)
            expect->mem[l][GUARD + nhd_index(kv, dst_slots[t], h, d)] =
                src->mem[l][GUARD + nhd_index(kv, src_slots[t], h, d)];
  }
}

static lmc_kv_layer_desc nhd_desc(const void *base) {
  lmc_kv_layer_desc d;
  memset(&d, 0, sizeof d);
  d.struct_size = (uint32_t)sizeof d;
  d.device_kind = LMC_DEVICE_HOST;
  d.device_index = 0;
  d.elem_size = 2;
  d.kv_count = 2;
  d.num_blocks = NB;
  d.block_size = BS;
  d.num_kv_heads = NH;
  d.head_size = HD;
  d.reserved = 0;
  d.base_address = (uint64_t)(uintptr_t)base;
  d.span_bytes = LAYER_BYTES;
  d.kv_stride = KV_STRIDE;
  d.block_stride = BLOCK_STRIDE;
  d.token_stride = TOK_STRIDE;
  d.head_stride = HD;
  return d;
}

static lmc_status kv_register(lmc_engine *e, const kvbuf *b, int nlayers) {
  lmc_kv_layer_desc descs[MAXL];
  int l;
  for (l = 0; l < nlayers; l++) descs[l] = nhd_desc(kv_base(b, l));
  return lmc_engine_register_layers(e, descs, nlayers);
}

/* ---------------------------------------------------------------------------------------------- */
/* Helpers                                                                                         */
/* ---------------------------------------------------------------------------------------------- */

#define NTOK 24 /* three chunks of CHUNK tokens */
#define SENTINEL_I64 ((int64_t)-777)
#define SENTINEL_ENGINE ((lmc_engine *)(uintptr_t)0x5e47)

static void make_tokens(int32_t *tokens, int n, int32_t seed) {
  int i;
  for (i = 0; i < n; i++) tokens[i] = seed * 1000 + i * 7 + 1;
}

/* Distinct slots: multiplying by a number coprime with NSLOTS permutes them. */
static void make_slots(int64_t *slots, int n, int mul, int add) {
  int i;
  for (i = 0; i < n; i++) slots[i] = (int64_t)((i * mul + add) % NSLOTS);
}

static lmc_engine *create_engine(const char *config, const char *what) {
  lmc_engine *e = NULL;
  lmc_status s = lmc_engine_create(&e, config, "smoke-model", 1, 0);
  EXPECT(s, LMC_OK, "lmc_engine_create(%s) for %s", config ? config : "NULL", what);
  return s == LMC_OK ? e : NULL;
}

static int get_stats(lmc_engine *e, lmc_stats *st) {
  memset(st, 0, sizeof *st);
  st->struct_size = (uint32_t)sizeof *st;
  return lmc_engine_get_stats(e, st) == LMC_OK;
}

static int64_t lookup_n(lmc_engine *e, const int32_t *tokens, int64_t n, const char *key,
                        lmc_status *status) {
  int64_t hit = SENTINEL_I64;
  *status = lmc_lookup(&hit, e, tokens, n, (const uint8_t *)key, key ? (int64_t)strlen(key) : 0);
  return hit;
}

/* lookup and check the hit count in one check line. */
static void expect_lookup(lmc_engine *e, const int32_t *tokens, int64_t n, const char *key,
                          int64_t want, const char *what) {
  lmc_status s;
  int64_t hit = lookup_n(e, tokens, n, key, &s);
  capture_message();
  report(s == LMC_OK && hit == want && g_msg[0] == '\0',
         "lookup %s (%d tokens%s%s) -> %s, hit %lld (want %lld)", what, (int)n, key ? ", key " : "",
         key ? key : "", sname(s), (long long)hit, (long long)want);
}

static void expect_store(lmc_engine *e, const int32_t *tokens, const int64_t *slots, int64_t n,
                         int64_t skip, const char *key, int64_t want, const char *what) {
  int64_t stored = SENTINEL_I64;
  lmc_status s = lmc_store(&stored, e, tokens, slots, n, skip, (const uint8_t *)key,
                           key ? (int64_t)strlen(key) : 0);
  capture_message();
  report(s == LMC_OK && stored == want && g_msg[0] == '\0',
         "store %s (%d tokens, skip %d) -> %s, stored %lld (want %lld)%s%.200s", what, (int)n,
         (int)skip, sname(s), (long long)stored, (long long)want, s != LMC_OK ? ": " : "", g_msg);
}

/* Extracts the integer value of "key" from a JSON text, loosely. Returns 1 when found. */
static int json_int(const char *json, const char *key, long long *value) {
  char quoted[128];
  const char *p;
  snprintf(quoted, sizeof quoted, "\"%s\"", key);
  p = strstr(json, quoted);
  if (!p) return 0;
  p += strlen(quoted);
  while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == ':') p++;
  if (!(*p == '-' || isdigit((unsigned char)*p))) return 0;
  *value = strtoll(p, NULL, 10);
  return 1;
}

/* ---------------------------------------------------------------------------------------------- */
/* Versions, status names, last error                                                              */
/* ---------------------------------------------------------------------------------------------- */

#define LMC_STR2(x) #x
#define LMC_STR(x) LMC_STR2(x)

static void test_versions(void) {
  const char *want = LMC_STR(LMC_VERSION_MAJOR) "." LMC_STR(LMC_VERSION_MINOR) "." LMC_STR(
      LMC_VERSION_PATCH);
  int32_t vn = lmc_version_number();
  int32_t abi = lmc_abi_version();
  const char *vs = lmc_version_string();
  const char *vs2 = lmc_version_string();
  report(vn == LMC_VERSION_NUMBER, "lmc_version_number() = %d (header %d)", (int)vn,
         (int)LMC_VERSION_NUMBER);
  report(abi == LMC_ABI_VERSION, "lmc_abi_version() = %d (header %d)", (int)abi,
         (int)LMC_ABI_VERSION);
  report(vs != NULL && strcmp(vs, want) == 0, "lmc_version_string() = \"%s\" (header \"%s\")",
         vs ? vs : "(NULL)", want);
  report(vs == vs2, "lmc_version_string() returns static storage (same pointer twice)");
}

static void test_status_names(void) {
  static const struct {
    lmc_status status;
    const char *name;
  } table[] = {
      {LMC_OK, "LMC_OK"},
      {LMC_E_INVALID_ARGUMENT, "LMC_E_INVALID_ARGUMENT"},
      {LMC_E_INVALID_HANDLE, "LMC_E_INVALID_HANDLE"},
      {LMC_E_UNSUPPORTED, "LMC_E_UNSUPPORTED"},
      {LMC_E_OUT_OF_MEMORY, "LMC_E_OUT_OF_MEMORY"},
      {LMC_E_NOT_FOUND, "LMC_E_NOT_FOUND"},
      {LMC_E_IO, "LMC_E_IO"},
      {LMC_E_CUDA, "LMC_E_CUDA"},
      {LMC_E_NO_DEVICE, "LMC_E_NO_DEVICE"},
      {LMC_E_BUFFER_TOO_SMALL, "LMC_E_BUFFER_TOO_SMALL"},
      {LMC_E_INTERNAL, "LMC_E_INTERNAL"},
      {1, "LMC_E_UNKNOWN"},
      {LMC_E_TIMEOUT, "LMC_E_TIMEOUT"},
      {-12, "LMC_E_UNKNOWN"},
      {INT32_MIN, "LMC_E_UNKNOWN"},
      {INT32_MAX, "LMC_E_UNKNOWN"},
  };
  size_t i;
  for (i = 0; i < sizeof table / sizeof table[0]; i++) {
    const char *n = lmc_status_name(table[i].status);
    report(n != NULL && strcmp(n, table[i].name) == 0, "lmc_status_name(%ld) = \"%s\"",
           (long)table[i].status, n ? n : "(NULL)");
  }
  report(lmc_status_name(LMC_E_IO) == lmc_status_name(LMC_E_IO),
         "lmc_status_name returns static storage (same pointer twice)");
}

static void test_last_error_basics(void) {
  const char *m = lmc_last_error_message();
  char first[2048];
  lmc_status s;
  int64_t needed = SENTINEL_I64;
  report(m != NULL && m[0] == '\0', "lmc_last_error_message() before any failure is \"\"");

  s = lmc_engine_get_config(&needed, NULL, NULL, 0);
  EXPECT(s, LMC_E_INVALID_HANDLE, "lmc_engine_get_config(engine NULL) sets a message");
  snprintf(first, sizeof first, "%s", g_msg);
  m = lmc_last_error_message();
  report(m != NULL && strcmp(m, first) == 0,
         "lmc_last_error_message() reads the same message twice");
}

/* ---------------------------------------------------------------------------------------------- */
/* Engine create / destroy                                                                         */
/* ---------------------------------------------------------------------------------------------- */

static void create_case(const char *config, const char *model, int32_t ws, int32_t wid,
                        lmc_status want, const char *needle, const char *what) {
  lmc_engine *e = SENTINEL_ENGINE;
  lmc_status s = lmc_engine_create(&e, config, model, ws, wid);
  expectf(s, want, needle, "lmc_engine_create(%s)", what);
  if (s == LMC_OK) {
    report(e != NULL && e != SENTINEL_ENGINE, "lmc_engine_create(%s) returns a handle", what);
    lmc_engine_destroy(e);
  } else if (want != LMC_OK) {
    report(e == SENTINEL_ENGINE, "lmc_engine_create(%s) leaves engine_out untouched", what);
  }
}

static void test_create(void) {
  lmc_status s;
  s = lmc_engine_create(NULL, "{}", "m", 1, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_engine_create(engine_out NULL)");

  create_case(NULL, "m", 1, 0, LMC_OK, NULL, "config NULL");
  create_case("", "m", 1, 0, LMC_OK, NULL, "config \"\"");
  create_case("{}", "m", 1, 0, LMC_OK, NULL, "config \"{}\"");
  create_case(" { } ", "m", 1, 0, LMC_OK, NULL, "config \" { } \"");
  create_case("{\"chunk_size\": 16, \"local_cpu\": true, \"max_local_cpu_size\": 0.5, "
              "\"save_unfull_chunk\": true, \"pre_caching_hash_algorithm\": \"xxh3_128\"}",
              "m", 1, 0, LMC_OK, NULL, "all documented keys, valid values");
  create_case("{\"pre_caching_hash_algorithm\": \"builtin\"}", "m", 1, 0, LMC_OK, NULL,
              "pre_caching_hash_algorithm builtin");
  create_case("{\"pre_caching_hash_algorithm\": \"sha256\"}", "m", 1, 0, LMC_OK, NULL,
              "pre_caching_hash_algorithm sha256");

  create_case("{", "m", 1, 0, LMC_E_INVALID_ARGUMENT, NULL, "invalid JSON \"{\"");
  create_case("not json", "m", 1, 0, LMC_E_INVALID_ARGUMENT, NULL, "invalid JSON \"not json\"");
  create_case("[1, 2]", "m", 1, 0, LMC_E_INVALID_ARGUMENT, NULL, "JSON array, not an object");
  create_case("{\"chunk_size\": 16} trailing", "m", 1, 0, LMC_E_INVALID_ARGUMENT, NULL,
              "JSON with trailing garbage");
  create_case("{\"no_such_key\": 1}", "m", 1, 0, LMC_E_INVALID_ARGUMENT, "no_such_key",
              "unknown key no_such_key");
  create_case("{\"chunk_size\": 0}", "m", 1, 0, LMC_E_INVALID_ARGUMENT, "chunk_size",
              "chunk_size 0");
  create_case("{\"chunk_size\": -256}", "m", 1, 0, LMC_E_INVALID_ARGUMENT, "chunk_size",
              "chunk_size -256");
  create_case("{\"chunk_size\": \"abc\"}", "m", 1, 0, LMC_E_INVALID_ARGUMENT, "chunk_size",
              "chunk_size \"abc\"");
  create_case("{\"chunk_size\": 1.5}", "m", 1, 0, LMC_E_INVALID_ARGUMENT, "chunk_size",
              "chunk_size 1.5");
  create_case("{\"max_local_cpu_size\": -1}", "m", 1, 0, LMC_E_INVALID_ARGUMENT,
              "max_local_cpu_size", "max_local_cpu_size -1");
  create_case("{\"save_unfull_chunk\": \"maybe\"}", "m", 1, 0, LMC_E_INVALID_ARGUMENT,
              "save_unfull_chunk", "save_unfull_chunk \"maybe\"");
  create_case("{\"pre_caching_hash_algorithm\": \"nope\"}", "m", 1, 0, LMC_E_INVALID_ARGUMENT,
              "pre_caching_hash_algorithm", "pre_caching_hash_algorithm \"nope\"");

  create_case("{}", NULL, 1, 0, LMC_E_INVALID_ARGUMENT, NULL, "model_name NULL");
  create_case("{}", "", 1, 0, LMC_OK, NULL, "model_name \"\"");
  create_case("{}", "\xe6\xa8\xa1\xe5\x9e\x8b-\xc3\xbc", 1, 0, LMC_OK, NULL,
              "UTF-8 model_name");
  create_case("{}", "m", 0, 0, LMC_E_INVALID_ARGUMENT, NULL, "world_size 0");
  create_case("{}", "m", -1, 0, LMC_E_INVALID_ARGUMENT, NULL, "world_size -1");
  create_case("{}", "m", 2, -1, LMC_E_INVALID_ARGUMENT, NULL, "worker_id -1");
  create_case("{}", "m", 2, 2, LMC_E_INVALID_ARGUMENT, NULL, "worker_id 2 of world_size 2");
  create_case("{}", "m", 4, 3, LMC_OK, NULL, "worker_id 3 of world_size 4");

  lmc_engine_destroy(NULL);
  report(1, "lmc_engine_destroy(NULL) is a no-op");
}

/* ---------------------------------------------------------------------------------------------- */
/* get_config                                                                                      */
/* ---------------------------------------------------------------------------------------------- */

static void check_config_text(lmc_engine *e, long long want_chunk, const char *what) {
  int64_t needed = SENTINEL_I64, n = SENTINEL_I64;
  char *buf;
  long long v = -1;
  lmc_status s = lmc_engine_get_config(&needed, e, NULL, 0);
  EXPECT(s, LMC_E_BUFFER_TOO_SMALL, "lmc_engine_get_config(buffer NULL, capacity 0) [%s]", what);
  report(needed > 2 && needed < (1 << 20), "size query [%s] reports needed = %lld bytes", what,
         (long long)needed);
  if (!(needed > 2 && needed < (1 << 20))) return;

  buf = (char *)malloc((size_t)needed + 64);
  memset(buf, 'X', (size_t)needed + 64);
  s = lmc_engine_get_config(&n, e, buf, -1);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_engine_get_config(capacity -1) [%s]", what);

  n = SENTINEL_I64;
  s = lmc_engine_get_config(&n, e, NULL, 16);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_engine_get_config(buffer NULL, capacity 16) [%s]", what);

  n = SENTINEL_I64;
  s = lmc_engine_get_config(&n, e, buf, needed - 1);
  EXPECT(s, LMC_E_BUFFER_TOO_SMALL, "lmc_engine_get_config(capacity needed-1) [%s]", what);
  {
    int untouched = 1;
    int64_t i;
    for (i = 0; i < needed + 64; i++)
      if (buf[i] != 'X') untouched = 0;
    report(n == needed && untouched,
           "get_config(capacity needed-1) [%s] reports needed %lld (want %lld), buffer untouched: "
           "%s",
           what, (long long)n, (long long)needed, untouched ? "yes" : "no");
  }

  n = SENTINEL_I64;
  s = lmc_engine_get_config(&n, e, buf, needed);
  EXPECT(s, LMC_OK, "lmc_engine_get_config(capacity needed) [%s]", what);
  if (s == LMC_OK) {
    size_t len = strnlen(buf, (size_t)needed);
    const char *end = buf + len;
    while (end > buf && isspace((unsigned char)end[-1])) end--;
    report(n == needed && (int64_t)len + 1 == needed,
           "get_config [%s] writes %lld bytes including the NUL (needed_out %lld)", what,
           (long long)len + 1, (long long)n);
    report(buf[0] == '{' && end > buf && end[-1] == '}', "get_config [%s] is a JSON object: %.160s",
           what, buf);
    report(json_int(buf, "chunk_size", &v) && v == want_chunk,
           "get_config [%s] has \"chunk_size\": %lld (want %lld)", what, v, want_chunk);
    report(strstr(buf, "\"max_local_cpu_size\"") && strstr(buf, "\"save_unfull_chunk\"") &&
               strstr(buf, "\"local_cpu\"") && strstr(buf, "\"pre_caching_hash_algorithm\""),
           "get_config [%s] lists local_cpu, max_local_cpu_size, save_unfull_chunk, "
           "pre_caching_hash_algorithm",
           what);
  }
  n = SENTINEL_I64;
  memset(buf, 'X', (size_t)needed + 64);
  s = lmc_engine_get_config(&n, e, buf, needed + 64);
  EXPECT(s, LMC_OK, "lmc_engine_get_config(capacity needed+64) [%s]", what);
  report(s == LMC_OK && n == needed && (int64_t)strnlen(buf, (size_t)needed + 64) + 1 == needed,
         "get_config(capacity needed+64) [%s] writes the same %lld bytes", what, (long long)n);
  free(buf);
}

static void test_get_config(void) {
  lmc_engine *e = create_engine(NULL, "get_config");
  lmc_engine *e8 = create_engine("{\"chunk_size\": 8}", "get_config");
  int64_t needed = SENTINEL_I64;
  lmc_status s;

  s = lmc_engine_get_config(NULL, e, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_engine_get_config(needed_out NULL)");
  s = lmc_engine_get_config(&needed, NULL, NULL, 0);
  EXPECT(s, LMC_E_INVALID_HANDLE, "lmc_engine_get_config(engine NULL)");
  report(needed == SENTINEL_I64, "get_config(engine NULL) leaves needed_out untouched");
  if (e) check_config_text(e, 256, "config NULL, default chunk_size");
  if (e8) check_config_text(e8, 8, "chunk_size 8");
  lmc_engine_destroy(e);
  lmc_engine_destroy(e8);
}

/* ---------------------------------------------------------------------------------------------- */
/* register_layers: every way to get it wrong                                                      */
/* ---------------------------------------------------------------------------------------------- */

typedef struct bad_layer_case {
  const char *what;
  const char *needle; /* the field the message must name, or NULL */
  int layer;          /* which of the two layers is broken */
  void (*mutate)(lmc_kv_layer_desc *d);
} bad_layer_case;

static void m_size0(lmc_kv_layer_desc *d) { d->struct_size = 0; }
static void m_size40(lmc_kv_layer_desc *d) { d->struct_size = 40; }
static void m_device7(lmc_kv_layer_desc *d) { d->device_kind = 7; }
static void m_elem3(lmc_kv_layer_desc *d) { d->elem_size = 3; }
static void m_elem0(lmc_kv_layer_desc *d) { d->elem_size = 0; }
static void m_kv3(lmc_kv_layer_desc *d) { d->kv_count = 3; }
static void m_blocks0(lmc_kv_layer_desc *d) { d->num_blocks = 0; }
static void m_bs0(lmc_kv_layer_desc *d) { d->block_size = 0; }
static void m_heads0(lmc_kv_layer_desc *d) { d->num_kv_heads = 0; }
static void m_hs0(lmc_kv_layer_desc *d) { d->head_size = 0; }
static void m_hsneg(lmc_kv_layer_desc *d) { d->head_size = -8; }
static void m_reserved(lmc_kv_layer_desc *d) { d->reserved = 1; }
static void m_base0(lmc_kv_layer_desc *d) { d->base_address = 0; }
static void m_unaligned(lmc_kv_layer_desc *d) { d->base_address += 1; }
static void m_span(lmc_kv_layer_desc *d) { d->span_bytes -= 2; }
static void m_span0(lmc_kv_layer_desc *d) { d->span_bytes = 0; }
static void m_heads_overlap(lmc_kv_layer_desc *d) { d->head_stride = HD / 2; }
static void m_tokens_overlap(lmc_kv_layer_desc *d) { d->token_stride = HD; }
static void m_token0(lmc_kv_layer_desc *d) { d->token_stride = 0; }
static void m_kv_overlap(lmc_kv_layer_desc *d) { d->kv_stride = 0; }
static void m_blocks_overlap(lmc_kv_layer_desc *d) { d->block_stride = TOK_STRIDE; }
static void m_neg_stride(lmc_kv_layer_desc *d) { d->block_stride = -BLOCK_STRIDE; }
static void m_heads_disagree(lmc_kv_layer_desc *d) {
  d->num_kv_heads = 1; /* still a valid description on its own */
}
static void m_elem_disagree(lmc_kv_layer_desc *d) {
  d->elem_size = 4; /* same bytes, now NHD with 4-byte elements and half the head size */
  d->head_size = HD / 2;
  d->head_stride = HD / 2;
  d->token_stride = NH * HD / 2;
  d->block_stride = BS * NH * HD / 2;
  d->kv_stride = NB * BS * NH * HD / 2;
}

static void test_register_invalid(void) {
  static const bad_layer_case cases[] = {
      {"struct_size 0", "struct_size", 0, m_size0},
      {"struct_size 40 (cut before base_address)", "struct_size", 0, m_size40},
      {"device_kind 7", "device_kind", 0, m_device7},
      {"elem_size 3", "elem_size", 0, m_elem3},
      {"elem_size 0", "elem_size", 0, m_elem0},
      {"kv_count 3", "kv_count", 0, m_kv3},
      {"num_blocks 0", "num_blocks", 0, m_blocks0},
      {"block_size 0", "block_size", 0, m_bs0},
      {"num_kv_heads 0", "num_kv_heads", 0, m_heads0},
      {"head_size 0", "head_size", 0, m_hs0},
      {"head_size -8", "head_size", 0, m_hsneg},
      {"reserved 1", "reserved", 0, m_reserved},
      {"base_address 0", "base_address", 0, m_base0},
      {"base_address not aligned to elem_size", "base_address", 0, m_unaligned},
      {"span_bytes 2 bytes too small", "span_bytes", 0, m_span},
      {"span_bytes 0", "span_bytes", 0, m_span0},
      {"head_stride D/2 (heads overlap)", "stride", 0, m_heads_overlap},
      {"token_stride D (tokens overlap)", "stride", 0, m_tokens_overlap},
      {"token_stride 0", "stride", 0, m_token0},
      {"kv_stride 0 with kv_count 2 (K and V overlap)", "stride", 0, m_kv_overlap},
      {"block_stride = token_stride (blocks overlap)", "stride", 0, m_blocks_overlap},
      {"negative block_stride (before base_address)", NULL, 0, m_neg_stride},
      {"layer 1 struct_size 0", "struct_size", 1, m_size0},
      {"layer 1 head_stride D/2", "stride", 1, m_heads_overlap},
      {"layer 1 num_kv_heads differs from layer 0", "num_kv_heads", 1, m_heads_disagree},
      {"layer 1 elem_size differs from layer 0", "elem_size", 1, m_elem_disagree},
  };
  lmc_engine *e = create_engine("{\"chunk_size\": 8, \"max_local_cpu_size\": 0.01}",
                                "register_layers validation");
  kvbuf b;
  lmc_kv_layer_desc descs[MAXL], good[MAXL];
  int32_t tokens[NTOK];
  int64_t slots[NTOK], out;
  uint16_t *big;
  size_t i;
  lmc_status s;
  if (!e) return;
  kv_alloc(&b);
  kv_pattern(&b, 1);
  make_tokens(tokens, NTOK, 1);
  make_slots(slots, NTOK, 5, 3);
  good[0] = nhd_desc(kv_base(&b, 0));
  good[1] = nhd_desc(kv_base(&b, 1));

  /* Lookup, store and retrieve need registered layers. */
  out = SENTINEL_I64;
  s = lmc_lookup(&out, e, tokens, NTOK, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_lookup before register_layers");
  s = lmc_store(&out, e, tokens, slots, NTOK, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_store before register_layers");
  s = lmc_retrieve(&out, e, tokens, slots, NTOK, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_retrieve before register_layers");
  report(out == SENTINEL_I64, "failed lookup/store/retrieve leave their out-parameter untouched");
  {
    lmc_stats st;
    memset(&st, 0, sizeof st);
    st.struct_size = (uint32_t)sizeof st;
    s = lmc_engine_get_stats(e, &st);
    EXPECT(s, LMC_OK, "lmc_engine_get_stats before register_layers");
    s = lmc_engine_clear(e);
    EXPECT(s, LMC_OK, "lmc_engine_clear before register_layers");
  }

  s = lmc_engine_register_layers(NULL, good, 2);
  EXPECT(s, LMC_E_INVALID_HANDLE, "lmc_engine_register_layers(engine NULL)");
  s = lmc_engine_register_layers(e, NULL, 2);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_engine_register_layers(layers NULL, 2)");
  s = lmc_engine_register_layers(e, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_engine_register_layers(layers NULL, 0)");
  s = lmc_engine_register_layers(e, good, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_engine_register_layers(0 layers)");
  s = lmc_engine_register_layers(e, good, -1);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_engine_register_layers(-1 layers)");

  for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    descs[0] = good[0];
    descs[1] = good[1];
    cases[i].mutate(&descs[cases[i].layer]);
    s = lmc_engine_register_layers(e, descs, 2);
    if (expectf(s, LMC_E_INVALID_ARGUMENT, cases[i].needle, "register_layers: %s", cases[i].what) &&
        cases[i].layer == 1 && !strchr(g_msg, '1'))
      report(0, "register_layers: %s: message should name layer 1: \"%s\"", cases[i].what, g_msg);
  }

  /* Two layers that partly overlap each other. */
  big = (uint16_t *)calloc(LAYER_ELEMS * 2, sizeof(uint16_t));
  descs[0] = nhd_desc(big);
  descs[1] = nhd_desc(big + HD); /* layer 1 starts inside layer 0 */
  s = lmc_engine_register_layers(e, descs, 2);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "register_layers: layer 1 overlaps layer 0 (offset by D)");
  descs[1] = nhd_desc(big + LAYER_ELEMS - HD); /* tail of 0 and head of 1 share one head */
  s = lmc_engine_register_layers(e, descs, 2);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "register_layers: layers share their last/first head");

  /* Failed registrations changed nothing: still no layers. */
  out = SENTINEL_I64;
  s = lmc_lookup(&out, e, tokens, NTOK, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lookup after failed registrations still needs layers");

  /* Allowed: two layers describing the very same memory (KV sharing), and adjacent layers. */
  descs[0] = nhd_desc(big);
  descs[1] = nhd_desc(big);
  s = lmc_engine_register_layers(e, descs, 2);
  EXPECT(s, LMC_OK, "register_layers: two layers on the same memory (KV sharing)");
  descs[1] = nhd_desc(big + LAYER_ELEMS);
  s = lmc_engine_register_layers(e, descs, 2);
  EXPECT(s, LMC_OK, "register_layers: two adjacent layers in one allocation");
  s = lmc_engine_register_layers(e, good, 1);
  EXPECT(s, LMC_OK, "register_layers: one layer");

  lmc_engine_destroy(e);
  free(big);
  kv_free(&b);
}

/* ---------------------------------------------------------------------------------------------- */
/* The round trip and the argument checks of lookup / store / retrieve                             */
/* ---------------------------------------------------------------------------------------------- */

/* Retrieves into `dst` (guard-filled, registered) and compares with the expected bytes. */
static void retrieve_and_verify(lmc_engine *e, kvbuf *dst, const kvbuf *src,
                                const int32_t *tokens, const int64_t *src_slots,
                                const int64_t *dst_slots, int64_t n, int64_t first,
                                int64_t want_retrieved, const char *what) {
  kvbuf expect;
  int64_t got = SENTINEL_I64;
  char where[256];
  int same;
  lmc_status s;
  kv_alloc(&expect);
  kv_fill(dst, GUARD_VALUE);
  kv_copy(&expect, dst);
  s = lmc_retrieve(&got, e, tokens, dst_slots, n, first, NULL, 0);
  capture_message();
  report(s == LMC_OK && got == want_retrieved,
         "retrieve %s (%d tokens, first_token_to_write %d) -> %s, retrieved %lld (want %lld)%s%s",
         what, (int)n, (int)first, sname(s), (long long)got, (long long)want_retrieved,
         s != LMC_OK ? ": " : "", g_msg);
  if (s == LMC_OK) apply_retrieve(&expect, src, src_slots, dst_slots, first, got, MAXL);
  where[0] = '\0';
  same = kv_equal(dst, &expect, where, sizeof where);
  report(same, "retrieve %s: destination bit-exact, other slots and guards untouched%s%s", what,
         where[0] ? " -- first difference at " : "", where);
  kv_free(&expect);
}

static void expect_untouched(const kvbuf *buf, const kvbuf *before, const char *what) {
  char where[256];
  int same;
  where[0] = '\0';
  same = kv_equal(buf, before, where, sizeof where);
  report(same, "%s: KV memory untouched%s%s", what,
         where[0] ? " -- first difference at " : "", where);
}

static uint64_t d64(uint64_t after, uint64_t before) { return after - before; }

static void test_round_trip(void) {
  lmc_engine *e = create_engine("{\"chunk_size\": 8, \"max_local_cpu_size\": 0.01}", "round trip");
  kvbuf src, dst, snap;
  int32_t tokA[NTOK + 8], tokB[NTOK], tokC[NTOK], tokD[NTOK], tokE[NTOK], tmp[NTOK];
  int64_t slots_src[NTOK + 8], slots_dst[NTOK + 8], slots_bad[NTOK + 8], out;
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
  expect_store(e, tokA, slots_src, NTOK, 0, NULL, NTOK, "A");
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

  get_stats(e, &st0);
  expect_store(e, tokA, slots_src, NTOK, 0, NULL, NTOK, "A again (already cached)");
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
  retrieve_and_verify(e, &dst, &src, tokA, slots_src, slots_dst, NTOK, 0, NTOK, "A");
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

  retrieve_and_verify(e, &dst, &src, tokA, slots_src, slots_dst, 20, 0, 16, "A, first 20 tokens");
  retrieve_and_verify(e, &dst, &src, tokA, slots_src, slots_dst, NTOK + 8, 0, NTOK,
                      "A plus 8 uncached tokens");
  retrieve_and_verify(e, &dst, &src, tokA, slots_src, slots_dst, NTOK, 8, NTOK,
                      "A from token 8 (engine owns the first 8)");
  memcpy(slots_bad, slots_dst, sizeof slots_bad);
  slots_bad[10] = -1;
  slots_bad[17] = -1;
  retrieve_and_verify(e, &dst, &src, tokA, slots_src, slots_bad, NTOK, 8, NTOK,
                      "A with slots 10 and 17 = -1");
  retrieve_and_verify(e, &dst, &src, tokA, slots_src, slots_dst, NTOK, NTOK, NTOK,
                      "A, first_token_to_write = num_tokens (writes nothing)");
  retrieve_and_verify(e, &dst, &src, tokB, slots_src, slots_dst, NTOK, 0, 0, "B (a miss)");
  retrieve_and_verify(e, &dst, &src, NULL, slots_src, NULL, 0, 0, 0, "of nothing (NULL, 0)");

  /* Retrieve with bad arguments: nothing written, out untouched. */
  kv_pattern(&dst, 7);
  kv_copy(&snap, &dst);
  get_stats(e, &st0);
  memcpy(slots_bad, slots_dst, sizeof slots_bad);
  slots_bad[5] = NSLOTS;
  out = SENTINEL_I64;
  s = lmc_retrieve(&out, e, tokA, slots_bad, NTOK, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "retrieve with slot %d = num_blocks*block_size at token 5",
         NSLOTS);
  expect_untouched(&dst, &snap, "retrieve with a slot past the cache");
  memcpy(slots_bad, slots_dst, sizeof slots_bad);
  slots_bad[NTOK + 3] = 1000000; /* past the cached prefix: must still fail before copying */
  s = lmc_retrieve(&out, e, tokA, slots_bad, NTOK + 8, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "retrieve with slot 1000000 at token 27 (past the hit)");
  expect_untouched(&dst, &snap, "retrieve with a slot past the cache after the hit");
  memcpy(slots_bad, slots_dst, sizeof slots_bad);
  slots_bad[3] = -2;
  s = lmc_retrieve(&out, e, tokA, slots_bad, NTOK, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "retrieve with slot -2 at token 3");
  slots_bad[3] = INT64_MIN;
  s = lmc_retrieve(&out, e, tokA, slots_bad, NTOK, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "retrieve with slot INT64_MIN at token 3");
  s = lmc_retrieve(&out, e, tokA, slots_dst, -1, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "retrieve with num_tokens -1");
  s = lmc_retrieve(&out, e, NULL, slots_dst, NTOK, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "retrieve with tokens NULL, num_tokens %d", NTOK);
  s = lmc_retrieve(&out, e, tokA, NULL, NTOK, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "retrieve with slot_mapping NULL, num_tokens %d", NTOK);
  s = lmc_retrieve(&out, e, tokA, slots_dst, NTOK, -1, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "retrieve with first_token_to_write -1");
  s = lmc_retrieve(&out, e, tokA, slots_dst, NTOK, NTOK + 1, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "retrieve with first_token_to_write num_tokens+1");
  s = lmc_retrieve(&out, e, tokA, slots_dst, NTOK, 0, NULL, 4);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "retrieve with extra_key NULL, extra_key_len 4");
  s = lmc_retrieve(&out, e, tokA, slots_dst, NTOK, 0, (const uint8_t *)"salt", -1);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "retrieve with extra_key_len -1");
  s = lmc_retrieve(NULL, e, tokA, slots_dst, NTOK, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "retrieve with retrieved_tokens_out NULL");
  expect_untouched(&dst, &snap, "all failed retrieves");
  s = lmc_retrieve(&out, NULL, tokA, slots_dst, NTOK, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_HANDLE, "retrieve with engine NULL");
  report(out == SENTINEL_I64, "failed retrieves leave retrieved_tokens_out untouched (%lld)",
         (long long)out);
  get_stats(e, &st1);
  report(st1.retrieve_requests == st0.retrieve_requests,
         "failed retrieves are not counted (retrieve_requests +%llu)",
         (unsigned long long)d64(st1.retrieve_requests, st0.retrieve_requests));

  /* Lookup with bad arguments. */
  out = SENTINEL_I64;
  s = lmc_lookup(NULL, e, tokA, NTOK, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lookup with hit_tokens_out NULL");
  s = lmc_lookup(&out, NULL, tokA, NTOK, NULL, 0);
  EXPECT(s, LMC_E_INVALID_HANDLE, "lookup with engine NULL");
  s = lmc_lookup(&out, e, NULL, NTOK, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lookup with tokens NULL, num_tokens %d", NTOK);
  s = lmc_lookup(&out, e, tokA, -1, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lookup with num_tokens -1");
  s = lmc_lookup(&out, e, tokA, NTOK, NULL, 3);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lookup with extra_key NULL, extra_key_len 3");
  s = lmc_lookup(&out, e, tokA, NTOK, (const uint8_t *)"salt", -1);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lookup with extra_key_len -1");
  report(out == SENTINEL_I64, "failed lookups leave hit_tokens_out untouched (%lld)",
         (long long)out);
  get_stats(e, &st0);
  report(st0.lookup_requests == st1.lookup_requests,
         "failed lookups are not counted (lookup_requests +%llu)",
         (unsigned long long)d64(st0.lookup_requests, st1.lookup_requests));
  expect_lookup(e, tokA, NTOK, NULL, NTOK, "A (counted)");
  get_stats(e, &st1);
  report(d64(st1.lookup_requests, st0.lookup_requests) == 1 &&
             d64(st1.lookup_tokens, st0.lookup_tokens) == NTOK &&
             d64(st1.lookup_hit_tokens, st0.lookup_hit_tokens) == NTOK,
         "stats after one lookup: lookup_requests +%llu (1), lookup_tokens +%llu (%d), "
         "lookup_hit_tokens +%llu (%d)",
         (unsigned long long)d64(st1.lookup_requests, st0.lookup_requests),
         (unsigned long long)d64(st1.lookup_tokens, st0.lookup_tokens), NTOK,
         (unsigned long long)d64(st1.lookup_hit_tokens, st0.lookup_hit_tokens), NTOK);

  /* Store with bad arguments: nothing cached, nothing counted. */
  s = kv_register(e, &src, 2);
  EXPECT(s, LMC_OK, "register_layers: back to the source buffers");
  get_stats(e, &st0);
  out = SENTINEL_I64;
  memcpy(slots_bad, slots_src, sizeof slots_bad);
  slots_bad[20] = NSLOTS;
  s = lmc_store(&out, e, tokB, slots_bad, NTOK, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "store with slot %d at token 20", NSLOTS);
  slots_bad[20] = -5;
  s = lmc_store(&out, e, tokB, slots_bad, NTOK, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "store with slot -5 at token 20");
  s = lmc_store(&out, e, tokB, slots_src, -1, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "store with num_tokens -1");
  s = lmc_store(&out, e, NULL, slots_src, NTOK, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "store with tokens NULL, num_tokens %d", NTOK);
  s = lmc_store(&out, e, tokB, NULL, NTOK, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "store with slot_mapping NULL, num_tokens %d", NTOK);
  s = lmc_store(&out, e, tokB, slots_src, NTOK, 0, NULL, 4);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "store with extra_key NULL, extra_key_len 4");
  s = lmc_store(&out, e, tokB, slots_src, NTOK, 0, (const uint8_t *)"salt", -1);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "store with extra_key_len -1");
  s = lmc_store(&out, e, tokB, slots_src, NTOK, -1, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "store with skip_leading_tokens -1");
  s = lmc_store(NULL, e, tokB, slots_src, NTOK, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "store with stored_tokens_out NULL");
  s = lmc_store(&out, NULL, tokB, slots_src, NTOK, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_HANDLE, "store with engine NULL");
  report(out == SENTINEL_I64, "failed stores leave stored_tokens_out untouched (%lld)",
         (long long)out);
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
  expect_store(e, tokB, slots_bad, NTOK, 0, NULL, 8, "B with slot -1 at token 12");
  expect_lookup(e, tokB, NTOK, NULL, 8, "B (only its first chunk)");

  expect_store(e, tokC, slots_src, NTOK, 8, NULL, 16, "C skipping 8 tokens");
  expect_lookup(e, tokC, NTOK, NULL, 0, "C (first chunk missing)");
  get_stats(e, &st0);
  expect_store(e, tokC, slots_src, NTOK, 0, NULL, NTOK, "C in full");
  get_stats(e, &st1);
  report(d64(st1.stored_tokens, st0.stored_tokens) == 8,
         "storing C in full copies only the missing chunk (stored_tokens +%llu, want 8)",
         (unsigned long long)d64(st1.stored_tokens, st0.stored_tokens));
  expect_lookup(e, tokC, NTOK, NULL, NTOK, "C");

  expect_store(e, tokD, slots_src, NTOK, 12, NULL, 16, "D skipping 12 (rounds down to 8)");
  expect_store(e, tokE, slots_src, 20, 0, NULL, 16, "E, 20 tokens (partial chunk dropped)");
  expect_lookup(e, tokE, 20, NULL, 16, "E, 20 tokens");
  expect_store(e, tokE, slots_src, 0, 0, NULL, 0, "of nothing (0 tokens)");

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
    out = SENTINEL_I64;
    s = lmc_retrieve(&out, e, tokA, slots_dst, NTOK, 0, NULL, 0);
    EXPECT(s, LMC_OK, "retrieve after the failed registration");
    expect_untouched(&dst, &snap, "retrieve after a failed registration to dst (layers are still src)");
    report(out == NTOK, "retrieve after the failed registration retrieved %lld (want %d)",
           (long long)out, NTOK);
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
  expect_store(e, tokA, slots_src, NTOK, 0, NULL, NTOK, "A after clear");
  s = kv_register(e, &src, 1);
  EXPECT(s, LMC_OK, "register_layers with 1 layer (namespace changes)");
  expect_lookup(e, tokA, NTOK, NULL, 0, "A after the namespace changed");
  s = kv_register(e, &src, 2);
  EXPECT(s, LMC_OK, "register_layers with 2 layers again");
  expect_lookup(e, tokA, NTOK, NULL, 0, "A (the cache was cleared by the namespace change)");
  get_stats(e, &st1);
  report(st1.cached_chunks == 0, "cached_chunks after the namespace change: %llu",
         (unsigned long long)st1.cached_chunks);

done:
  lmc_engine_destroy(e);
  kv_free(&src);
  kv_free(&dst);
  kv_free(&snap);
}

/* save_unfull_chunk: the trailing partial chunk is stored, found and retrieved. */
static void test_unfull_chunk(void) {
  lmc_engine *e = create_engine(
      "{\"chunk_size\": 8, \"save_unfull_chunk\": true, \"max_local_cpu_size\": 0.01}",
      "save_unfull_chunk");
  kvbuf src, dst;
  int32_t tok[NTOK];
  int64_t slots_src[NTOK], slots_dst[NTOK];
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
    expect_store(e, tok, slots_src, 20, 0, NULL, 20, "20 tokens [save_unfull_chunk]");
    expect_lookup(e, tok, 20, NULL, 20, "20 tokens [save_unfull_chunk]");
    expect_lookup(e, tok, 19, NULL, 16, "19 tokens [save_unfull_chunk]");
    s = kv_register(e, &dst, 2);
    EXPECT(s, LMC_OK, "register_layers: second buffer set [save_unfull_chunk]");
    retrieve_and_verify(e, &dst, &src, tok, slots_src, slots_dst, 20, 0, 20,
                        "20 tokens [save_unfull_chunk]");
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
  int32_t tok[6][CHUNK];
  int64_t slots[CHUNK];
  lmc_stats st;
  lmc_status s;
  int i;
  if (!e) return;
  kv_alloc(&src);
  kv_pattern(&src, 5);
  make_slots(slots, CHUNK, 1, 0);
  s = kv_register(e, &src, 2);
  EXPECT(s, LMC_OK, "register_layers [eviction]");
  if (s == LMC_OK) {
    for (i = 0; i < 6; i++) {
      char what[64];
      make_tokens(tok[i], CHUNK, 100 + i);
      snprintf(what, sizeof what, "one chunk #%d [eviction]", i);
      expect_store(e, tok[i], slots, CHUNK, 0, NULL, CHUNK, what);
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
  }
  lmc_engine_destroy(e);
  kv_free(&src);
}

/* ---------------------------------------------------------------------------------------------- */
/* Layouts: store from one layout, retrieve into another (any element size, MLA, padding)          */
/* ---------------------------------------------------------------------------------------------- */

enum layout_kind { L_NHD, L_HND, L_BLOCKS_FIRST, L_PACKED, L_NHD_PADDED, L_MLA, L_MLA_PADDED };

static const char *layout_name(enum layout_kind k) {
  switch (k) {
  case L_NHD: return "FlashAttention NHD";
  case L_HND: return "FlashAttention HND";
  case L_BLOCKS_FIRST: return "blocks-first [B,2,N,H,D]";
  case L_PACKED: return "packed [B,H,N,2D]";
  case L_NHD_PADDED: return "NHD with padded blocks";
  case L_MLA: return "MLA [B,N,C]";
  default: return "MLA with padded blocks";
  }
}

/* A description of the layout (base_address and span_bytes left for layout_set to fill). */
static lmc_kv_layer_desc layout_desc(enum layout_kind k, int32_t elem_size) {
  const int64_t B = NB, N = BS, H = NH, D = HD;
  lmc_kv_layer_desc d = nhd_desc(NULL);
  d.elem_size = elem_size;
  switch (k) {
  case L_NHD: break;
  case L_HND:
    d.kv_stride = B * H * N * D; d.block_stride = H * N * D; d.token_stride = D; d.head_stride = N * D;
    break;
  case L_BLOCKS_FIRST:
    d.kv_stride = N * H * D; d.block_stride = 2 * N * H * D; d.token_stride = H * D; d.head_stride = D;
    break;
  case L_PACKED:
    d.kv_stride = D; d.block_stride = H * N * 2 * D; d.token_stride = 2 * D; d.head_stride = N * 2 * D;
    break;
  case L_NHD_PADDED:
    d.block_stride = N * H * D + 24; d.kv_stride = B * d.block_stride + 8;
    break;
  case L_MLA:
  case L_MLA_PADDED:
    /* kv_stride is ignored when kv_count == 1: 0 must be accepted. */
    d.kv_count = 1; d.num_kv_heads = 1; d.head_size = 2 * HD; d.kv_stride = 0;
    d.token_stride = 2 * HD; d.head_stride = 2 * HD;
    d.block_stride = N * 2 * HD + (k == L_MLA_PADDED ? 8 : 0);
    break;
  }
  return d;
}

enum { GUARD_BYTES = 128 };

typedef struct layout_set {
  int nlayers;
  lmc_kv_layer_desc desc[MAXL];
  unsigned char *mem[MAXL]; /* GUARD_BYTES + span_bytes + GUARD_BYTES */
} layout_set;

static uint64_t desc_span(const lmc_kv_layer_desc *d) {
  int64_t last = (d->kv_count - 1) * (d->kv_count > 1 ? d->kv_stride : 0) +
                 (d->num_blocks - 1) * d->block_stride + (d->block_size - 1) * d->token_stride +
                 (d->num_kv_heads - 1) * d->head_stride + (d->head_size - 1);
  return (uint64_t)(last + 1) * (uint64_t)d->elem_size;
}

static void ls_init(layout_set *s, enum layout_kind k0, enum layout_kind k1, int32_t elem_size) {
  int l;
  s->nlayers = MAXL;
  for (l = 0; l < MAXL; l++) {
    s->desc[l] = layout_desc(l == 0 ? k0 : k1, elem_size);
    s->desc[l].span_bytes = desc_span(&s->desc[l]);
    s->mem[l] = (unsigned char *)malloc(GUARD_BYTES * 2 + s->desc[l].span_bytes);
    if (!s->mem[l]) exit(2);
    memset(s->mem[l], 0xA5, GUARD_BYTES * 2 + s->desc[l].span_bytes);
    s->desc[l].base_address = (uint64_t)(uintptr_t)(s->mem[l] + GUARD_BYTES);
  }
}

static size_t ls_bytes(const layout_set *s, int l) { return GUARD_BYTES * 2 + s->desc[l].span_bytes; }

static void ls_free(layout_set *s) {
  int l;
  for (l = 0; l < s->nlayers; l++) free(s->mem[l]);
}

/* Same shapes and fresh memory with the same content. */
static void ls_clone(layout_set *dst, const layout_set *src) {
  int l;
  *dst = *src;
  for (l = 0; l < src->nlayers; l++) {
    dst->mem[l] = (unsigned char *)malloc(ls_bytes(src, l));
    if (!dst->mem[l]) exit(2);
    memcpy(dst->mem[l], src->mem[l], ls_bytes(src, l));
    dst->desc[l].base_address = (uint64_t)(uintptr_t)(dst->mem[l] + GUARD_BYTES);
  }
}

static void ls_pattern(layout_set *s, unsigned seed) {
  int l;
  uint64_t i;
  for (l = 0; l < s->nlayers; l++)
    for (i = 0; i < s->desc[l].span_bytes; i++) {
      uint32_t x = (seed + 1u) * 2654435761u ^ (uint32_t)(l * 97u + i * 131u);
      x ^= x >> 15;
      x *= 0x2c1b3c6du;
      x ^= x >> 12;
      s->mem[l][GUARD_BYTES + i] = (unsigned char)x;
    }
}

static size_t elem_offset(const lmc_kv_layer_desc *d, int kv, int64_t slot, int h, int e) {
  int64_t idx = (int64_t)kv * d->kv_stride + (slot / d->block_size) * d->block_stride +
                (slot % d->block_size) * d->token_stride + (int64_t)h * d->head_stride + e;
  return (size_t)idx * (size_t)d->elem_size;
}

static void ls_apply_retrieve(layout_set *expect, const layout_set *src, const int64_t *src_slots,
                              const int64_t *dst_slots, int64_t first, int64_t retrieved) {
  int64_t t;
  int l, kv, h, e;
  for (t = first; t < retrieved; t++) {
    if (dst_slots[t] == -1) continue;
    for (l = 0; l < expect->nlayers; l++) {
      const lmc_kv_layer_desc *dd = &expect->desc[l], *sd = &src->desc[l];
      for (kv = 0; kv < dd->kv_count; kv++)
        for (h = 0; h < dd->num_kv_heads; h++)
          for (e = 0; e < dd->head_size; e++)
            memcpy(expect->mem[l] + GUARD_BYTES + elem_offset(dd, kv, dst_slots[t], h, e),
                   src->mem[l] + GUARD_BYTES + elem_offset(sd, kv, src_slots[t], h, e),
                   (size_t)dd->elem_size);
    }
  }
}

static int ls_equal(const layout_set *a, const layout_set *b, char *where, size_t where_len) {
  int l;
  size_t i;
  for (l = 0; l < a->nlayers; l++)
    for (i = 0; i < ls_bytes(a, l); i++)
      if (a->mem[l][i] != b->mem[l][i]) {
        long off = (long)i - GUARD_BYTES;
        snprintf(where, where_len, "layer %d byte %ld of %llu%s: got 0x%02x, want 0x%02x", l, off,
                 (unsigned long long)a->desc[l].span_bytes,
                 off < 0 || off >= (long)a->desc[l].span_bytes ? " (guard)" : "", a->mem[l][i],
                 b->mem[l][i]);
        return 0;
      }
  return 1;
}

/* Stores from `src_kind` layers and retrieves into each of `dst_kinds`, comparing every byte. */
static void cross_layout_case(int32_t elem_size, enum layout_kind src_kind,
                              const enum layout_kind (*dst_kinds)[2], int ndst) {
  char what[160];
  lmc_engine *e;
  layout_set src;
  int32_t tok[NTOK];
  int64_t slots_src[NTOK], slots_dst[NTOK], got;
  lmc_status s;
  int i;
  snprintf(what, sizeof what, "layouts, elem_size %d, from %s", (int)elem_size,
           layout_name(src_kind));
  e = create_engine("{\"chunk_size\": 8, \"max_local_cpu_size\": 0.01}", what);
  if (!e) return;
  ls_init(&src, src_kind, src_kind, elem_size);
  ls_pattern(&src, (unsigned)elem_size * 7u + (unsigned)src_kind);
  make_tokens(tok, NTOK, 50 + elem_size);
  make_slots(slots_src, NTOK, 5, 3);
  make_slots(slots_dst, NTOK, 7, 1);
  slots_dst[13] = -1;
  s = lmc_engine_register_layers(e, src.desc, src.nlayers);
  EXPECT(s, LMC_OK, "register_layers: %s, elem_size %d", layout_name(src_kind), (int)elem_size);
  if (s == LMC_OK) {
    expect_store(e, tok, slots_src, NTOK, 0, NULL, NTOK, what);
    for (i = 0; i < ndst; i++) {
      layout_set dst, expect;
      char where[200];
      int same;
      ls_init(&dst, dst_kinds[i][0], dst_kinds[i][1], elem_size);
      ls_clone(&expect, &dst);
      s = lmc_engine_register_layers(e, dst.desc, dst.nlayers);
      EXPECT(s, LMC_OK, "register_layers: layer 0 %s, layer 1 %s, elem_size %d",
             layout_name(dst_kinds[i][0]), layout_name(dst_kinds[i][1]), (int)elem_size);
      got = SENTINEL_I64;
      s = lmc_retrieve(&got, e, tok, slots_dst, NTOK, 4, NULL, 0);
      capture_message();
      report(s == LMC_OK && got == NTOK,
             "retrieve into layer 0 %s / layer 1 %s (elem_size %d) -> %s, retrieved %lld (want %d) %s",
             layout_name(dst_kinds[i][0]), layout_name(dst_kinds[i][1]), (int)elem_size, sname(s),
             (long long)got, NTOK, g_msg);
      if (s == LMC_OK) ls_apply_retrieve(&expect, &src, slots_src, slots_dst, 4, got);
      where[0] = '\0';
      same = ls_equal(&dst, &expect, where, sizeof where);
      report(same,
             "%s -> layer 0 %s / layer 1 %s (elem_size %d): bit-exact, padding and guards "
             "untouched%s%s",
             layout_name(src_kind), layout_name(dst_kinds[i][0]), layout_name(dst_kinds[i][1]),
             (int)elem_size, where[0] ? " -- first difference at " : "", where);
      ls_free(&dst);
      ls_free(&expect);
    }
  }
  lmc_engine_destroy(e);
  ls_free(&src);
}

static void test_layouts(void) {
  static const enum layout_kind kv_dsts[][2] = {
      {L_HND, L_HND},
      {L_BLOCKS_FIRST, L_BLOCKS_FIRST},
      {L_PACKED, L_PACKED},
      {L_NHD_PADDED, L_NHD_PADDED},
      {L_NHD, L_HND}, /* strides may differ per layer */
  };
  static const enum layout_kind mla_dsts[][2] = {{L_MLA_PADDED, L_MLA_PADDED}};
  cross_layout_case(2, L_NHD, kv_dsts, (int)(sizeof kv_dsts / sizeof kv_dsts[0]));
  cross_layout_case(4, L_HND, kv_dsts, 2);
  cross_layout_case(1, L_PACKED, kv_dsts, 4);
  cross_layout_case(1, L_MLA, mla_dsts, 1);
  cross_layout_case(2, L_MLA, mla_dsts, 1);
}

/* ---------------------------------------------------------------------------------------------- */
/* Threads                                                                                         */
/* ---------------------------------------------------------------------------------------------- */

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
    int64_t hit = -1;
    if (lmc_lookup(&hit, w->e, w->tokens, NTOK, NULL, 0) != LMC_OK || hit != NTOK) w->bad++;
  }
  return NULL;
}

static void test_threads(void) {
  lmc_engine *e = create_engine("{\"chunk_size\": 8, \"max_local_cpu_size\": 0.05}", "threads");
  kvbuf src;
  int32_t tokA[NTOK], tok[NTOK];
  int64_t slots[NTOK], out;
  pthread_t th[4];
  lookup_worker w[4];
  thread_result r;
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
  s = lmc_lookup(NULL, e, tokA, NTOK, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lookup(hit_tokens_out NULL) on the main thread");
  snprintf(mine, sizeof mine, "%s", g_msg);
  memset(&r, 0, sizeof r);
  pthread_create(&th[0], NULL, error_thread, &r);
  pthread_join(th[0], NULL);
  report(r.fresh_empty, "a new thread's lmc_last_error_message() is \"\"");
  report(r.own_failure, "a failure on the new thread sets its own message");
  report(r.success_clears, "a success on the new thread clears its message");
  m = lmc_last_error_message();
  report(m != NULL && strcmp(m, mine) == 0,
         "the main thread's message is unchanged by the other thread (\"%.100s\")", m ? m : "");

  /* Lookups on 4 threads while this thread stores and retrieves. */
  for (i = 0; i < 4; i++) {
    w[i].e = e;
    w[i].tokens = tokA;
    w[i].iterations = 300;
    w[i].bad = 0;
    pthread_create(&th[i], NULL, lookup_thread, &w[i]);
  }
  for (i = 0; i < 100; i++) {
    make_tokens(tok, NTOK, 1000 + i);
    if (lmc_store(&out, e, tok, slots, NTOK, 0, NULL, 0) != LMC_OK || out != NTOK) bad++;
    if (lmc_retrieve(&out, e, tok, slots, NTOK, 0, NULL, 0) != LMC_OK || out != NTOK) bad++;
  }
  for (i = 0; i < 4; i++) {
    pthread_join(th[i], NULL);
    bad += w[i].bad;
  }
  report(bad == 0, "4 threads x 300 lookups during 100 stores + retrieves: %d bad results", bad);

done:
  lmc_engine_destroy(e);
  kv_free(&src);
}

/* ---------------------------------------------------------------------------------------------- */
/* Handles: destroyed, reused, foreign                                                             */
/* ---------------------------------------------------------------------------------------------- */

static void test_destroyed_handle(void) {
  lmc_engine *e = create_engine("{\"chunk_size\": 8, \"max_local_cpu_size\": 0.01}", "destroy");
  lmc_engine *later[4];
  kvbuf src;
  lmc_kv_layer_desc descs[2];
  int32_t tok[NTOK];
  int64_t slots[NTOK], out = SENTINEL_I64, needed = SENTINEL_I64;
  char buf[64];
  lmc_stats st;
  lmc_status s;
  int i, reused = 0;
  if (!e) return;
  kv_alloc(&src);
  kv_pattern(&src, 11);
  make_tokens(tok, NTOK, 6);
  make_slots(slots, NTOK, 5, 3);
  s = kv_register(e, &src, 2);
  EXPECT(s, LMC_OK, "register_layers [destroy]");
  expect_store(e, tok, slots, NTOK, 0, NULL, NTOK, "before destroy");
  lmc_engine_destroy(e);
  report(1, "lmc_engine_destroy(engine with cached data)");

  kv_fill(&src, GUARD_VALUE);
  descs[0] = nhd_desc(kv_base(&src, 0));
  descs[1] = nhd_desc(kv_base(&src, 1));
  s = lmc_engine_get_config(&needed, e, NULL, 0);
  EXPECT(s, LMC_E_INVALID_HANDLE, "destroyed handle: lmc_engine_get_config");
  s = lmc_engine_get_config(&needed, e, buf, sizeof buf);
  EXPECT(s, LMC_E_INVALID_HANDLE, "destroyed handle: lmc_engine_get_config with a buffer");
  s = lmc_engine_register_layers(e, descs, 2);
  EXPECT(s, LMC_E_INVALID_HANDLE, "destroyed handle: lmc_engine_register_layers");
  s = lmc_lookup(&out, e, tok, NTOK, NULL, 0);
  EXPECT(s, LMC_E_INVALID_HANDLE, "destroyed handle: lmc_lookup");
  s = lmc_store(&out, e, tok, slots, NTOK, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_HANDLE, "destroyed handle: lmc_store");
  s = lmc_retrieve(&out, e, tok, slots, NTOK, 0, NULL, 0);
  EXPECT(s, LMC_E_INVALID_HANDLE, "destroyed handle: lmc_retrieve");
  memset(&st, 0, sizeof st);
  st.struct_size = (uint32_t)sizeof st;
  s = lmc_engine_get_stats(e, &st);
  EXPECT(s, LMC_E_INVALID_HANDLE, "destroyed handle: lmc_engine_get_stats");
  s = lmc_engine_clear(e);
  EXPECT(s, LMC_E_INVALID_HANDLE, "destroyed handle: lmc_engine_clear");
  report(out == SENTINEL_I64 && needed == SENTINEL_I64,
         "destroyed handle: out-parameters untouched");
  {
    int untouched = 1;
    size_t k;
    for (k = 0; k < BUF_ELEMS; k++)
      if (src.mem[0][k] != GUARD_VALUE || src.mem[1][k] != GUARD_VALUE) untouched = 0;
    report(untouched, "destroyed handle: previously registered KV memory untouched");
  }
  lmc_engine_destroy(e);
  report(1, "lmc_engine_destroy twice is a no-op");

  for (i = 0; i < 4; i++) {
    later[i] = NULL;
    s = lmc_engine_create(&later[i], "{}", "m", 1, 0);
    if (s == LMC_OK && later[i] == e) reused++;
  }
  report(reused == 0, "new engines never get the destroyed handle back (%d of 4 did)", reused);
  s = lmc_engine_clear(e);
  EXPECT(s, LMC_E_INVALID_HANDLE, "destroyed handle after new engines: lmc_engine_clear");
  s = lmc_engine_clear(later[0]);
  EXPECT(s, LMC_OK, "a new engine works after another was destroyed");
  for (i = 0; i < 4; i++) lmc_engine_destroy(later[i]);
  kv_free(&src);
}

/* Child process: pointers the library never handed out. Exit 0 when all are refused. */
static int probe_foreign_handles(void) {
  int local = 0;
  lmc_engine *bogus[4];
  lmc_stats st;
  int64_t out = 0;
  int i, bad = 0;
  bogus[0] = (lmc_engine *)(uintptr_t)0x1;
  bogus[1] = (lmc_engine *)(void *)&local;
  bogus[2] = (lmc_engine *)(uintptr_t)0xdeadbeef000ull;
  bogus[3] = (lmc_engine *)(uintptr_t)UINTPTR_MAX;
  for (i = 0; i < 4; i++) {
    lmc_status s1, s2, s3;
    memset(&st, 0, sizeof st);
    st.struct_size = (uint32_t)sizeof st;
    s1 = lmc_engine_get_stats(bogus[i], &st);
    s2 = lmc_lookup(&out, bogus[i], NULL, 0, NULL, 0);
    s3 = lmc_engine_clear(bogus[i]);
    lmc_engine_destroy(bogus[i]);
    if (s1 != LMC_E_INVALID_HANDLE || s2 != LMC_E_INVALID_HANDLE || s3 != LMC_E_INVALID_HANDLE) {
      fprintf(stderr, "# foreign handle %p: get_stats %s, lookup %s, clear %s\n",
              (void *)bogus[i], sname(s1), sname(s2), sname(s3));
      bad++;
    }
  }
  return bad ? 1 : 0;
}

static void test_foreign_handles(void) {
  char *argv[] = {(char *)"smoke", (char *)"--probe", (char *)"foreign-handle", NULL};
  pid_t pid;
  int status = 0;
  fflush(stdout);
  if (posix_spawn(&pid, "/proc/self/exe", NULL, NULL, argv, environ) != 0) {
    report(0, "foreign handles: could not start the child process");
    return;
  }
  waitpid(pid, &status, 0);
  if (WIFSIGNALED(status))
    report(0,
           "unknown handles (0x1, a stack address, 0xdeadbeef000, ~0) -> child killed by signal %d "
           "(the library crashed)",
           WTERMSIG(status));
  else
    report(WEXITSTATUS(status) == 0,
           "unknown handles (0x1, a stack address, 0xdeadbeef000, ~0) -> LMC_E_INVALID_HANDLE from "
           "get_stats, lookup, clear; destroy is a no-op (child exit %d)",
           WEXITSTATUS(status));
}

/* CUDA layers. Without a GPU (no libcuda.so.1, or cuInit failing: what a CI machine with the CUDA
 * toolkit has) the answer is LMC_E_NO_DEVICE with a message saying which; with a GPU, host pointers
 * posing as device memory are refused by the driver check as invalid. */
static void test_cuda_layers(void) {
  lmc_engine *e = create_engine("{\"chunk_size\": 8}", "CUDA layers");
  lmc_kv_layer_desc d[2];
  struct stat sb;
  int have_gpu = stat("/dev/nvidia0", &sb) == 0;
  int32_t count = -7;
  lmc_status s;
  if (!e) return;

  s = lmc_cuda_device_count(&count);
  capture_message();
  if (have_gpu)
    report(s == LMC_OK && count >= 1 && g_msg[0] == '\0', "lmc_cuda_device_count (GPU present) -> %s, %d device(s)",
           sname(s), (int)count);
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
           "register_layers with CUDA layers, no GPU -> %s (want LMC_E_NO_DEVICE) \"%.200s\"", sname(s),
           g_msg);
  d[0].device_index = d[1].device_index = -1;
  s = lmc_engine_register_layers(e, d, 2);
  capture_message();
  report(s == LMC_E_INVALID_ARGUMENT && contains_ci(g_msg, "device_index"),
         "register_layers with CUDA device_index -1 -> %s \"%.200s\"", sname(s), g_msg);
  lmc_engine_destroy(e);
}

/* Child process with LMC_CUDA_LIBRARY=/nonexistent: the machine without libcuda.so.1. */
static int probe_no_driver(void) {
  kvbuf src, dst, expect;
  lmc_engine *e = NULL;
  lmc_kv_layer_desc d[MAXL];
  int32_t tokens[NTOK], count = -7;
  int64_t slots[NTOK], n = -1;
  int bad = 0, l;
  lmc_status s;
  char where[200];

  s = lmc_cuda_device_count(&count);
  if (s != LMC_E_NO_DEVICE || count != -7 || !contains_ci(lmc_last_error_message(), "/nonexistent")) {
    fprintf(stderr, "device_count: %d \"%s\"\n", (int)s, lmc_last_error_message());
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
    fprintf(stderr, "register CUDA: %d \"%s\"\n", (int)s, lmc_last_error_message());
    bad++;
  }
  /* The CPU path of the same engine works. */
  make_tokens(tokens, NTOK, 5);
  make_slots(slots, NTOK, 5, 3);
  if (kv_register(e, &src, MAXL) != LMC_OK || lmc_store(&n, e, tokens, slots, NTOK, 0, NULL, 0) != LMC_OK ||
      n != NTOK) {
    fprintf(stderr, "host store: \"%s\"\n", lmc_last_error_message());
    bad++;
  }
  kv_fill(&dst, GUARD_VALUE);
  kv_copy(&expect, &dst);
  apply_retrieve(&expect, &src, slots, slots, 0, NTOK, MAXL);
  if (kv_register(e, &dst, MAXL) != LMC_OK || lmc_retrieve(&n, e, tokens, slots, NTOK, 0, NULL, 0) != LMC_OK ||
      n != NTOK || !kv_equal(&dst, &expect, where, sizeof where)) {
    fprintf(stderr, "host retrieve: \"%s\"\n", lmc_last_error_message());
    bad++;
  }
  lmc_engine_destroy(e);
  kv_free(&src);
  kv_free(&dst);
  kv_free(&expect);
  return bad ? 1 : 0;
}

static void test_no_driver(void) {
  char *argv[] = {(char *)"smoke", (char *)"--probe", (char *)"no-driver", NULL};
  char **env;
  size_t n = 0, i, j = 0;
  pid_t pid;
  int status = 0;
  while (environ[n]) n++;
  env = (char **)calloc(n + 2, sizeof *env);
  if (!env) return;
  for (i = 0; i < n; i++)
    if (strncmp(environ[i], "LMC_CUDA_LIBRARY=", 17) != 0) env[j++] = environ[i];
  env[j++] = (char *)"LMC_CUDA_LIBRARY=/nonexistent";
  env[j] = NULL;
  fflush(stdout);
  if (posix_spawn(&pid, "/proc/self/exe", NULL, NULL, argv, env) != 0) {
    report(0, "no driver: could not start the child process");
    free(env);
    return;
  }
  free(env);
  waitpid(pid, &status, 0);
  report(WIFEXITED(status) && WEXITSTATUS(status) == 0,
         "LMC_CUDA_LIBRARY=/nonexistent (no libcuda.so.1): device count and CUDA registration -> "
         "LMC_E_NO_DEVICE naming the library; host layers of the same engine store and retrieve "
         "(child %s %d)",
         WIFSIGNALED(status) ? "killed by signal" : "exit",
         WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
}

/* lmc_store_async / lmc_retrieve_async: argument checks, and with host layers a synchronous copy
 * returned as a finished job (the stream is ignored). */
static void test_async_transfers(void) {
  kvbuf src, dst, expect;
  lmc_engine *e = create_engine("{\"chunk_size\": 8}", "async transfers");
  int32_t tokens[NTOK];
  int64_t slots[NTOK], slots2[NTOK], n = SENTINEL_I64, result = SENTINEL_I64;
  lmc_job *job = NULL;
  void *stream = (void *)(uintptr_t)0x1234;
  lmc_stats st;
  char where[200];
  int ok;
  if (!e) return;
  kv_alloc(&src);
  kv_alloc(&dst);
  kv_alloc(&expect);
  kv_pattern(&src, 21);
  make_tokens(tokens, NTOK, 21);
  make_slots(slots, NTOK, 7, 1);
  make_slots(slots2, NTOK, 3, 5);

  EXPECT_MSG(lmc_store_async(&job, &n, e, tokens, slots, NTOK, 0, NULL, 0, stream), LMC_E_INVALID_ARGUMENT,
             "register", "lmc_store_async before register_layers");
  report(job == NULL && n == SENTINEL_I64, "failed lmc_store_async leaves job_out and stored_tokens_out untouched");
  EXPECT(kv_register(e, &src, MAXL), LMC_OK, "register host layers for the async calls");
  EXPECT_MSG(lmc_store_async(NULL, &n, e, tokens, slots, NTOK, 0, NULL, 0, stream), LMC_E_INVALID_ARGUMENT,
             "job_out", "lmc_store_async(job_out NULL)");
  EXPECT_MSG(lmc_store_async(&job, NULL, e, tokens, slots, NTOK, 0, NULL, 0, stream), LMC_E_INVALID_ARGUMENT,
             "stored_tokens_out", "lmc_store_async(stored_tokens_out NULL)");
  EXPECT(lmc_store_async(&job, &n, SENTINEL_ENGINE, tokens, slots, NTOK, 0, NULL, 0, stream),
         LMC_E_INVALID_HANDLE, "lmc_store_async(unknown engine)");
  EXPECT_MSG(lmc_store_async(&job, &n, e, tokens, NULL, NTOK, 0, NULL, 0, stream), LMC_E_INVALID_ARGUMENT,
             "slot_mapping", "lmc_store_async(slot_mapping NULL)");
  EXPECT_MSG(lmc_retrieve_async(&job, &n, e, tokens, slots, NTOK, NTOK + 1, NULL, 0, stream),
             LMC_E_INVALID_ARGUMENT, "first_token_to_write", "lmc_retrieve_async(first_token_to_write > num_tokens)");
  EXPECT_MSG(lmc_retrieve_async(NULL, &n, e, tokens, slots, NTOK, 0, NULL, 0, stream), LMC_E_INVALID_ARGUMENT,
             "job_out", "lmc_retrieve_async(job_out NULL)");

  if (EXPECT(lmc_store_async(&job, &n, e, tokens, slots, NTOK, 0, (const uint8_t *)"a", 1, stream), LMC_OK,
             "lmc_store_async, host layers, stream ignored")) {
    report(n == NTOK && job != NULL, "lmc_store_async: stored_tokens_out = %lld (want %d), job returned",
           (long long)n, NTOK);
    EXPECT(lmc_job_wait(&result, job, 0), LMC_OK, "lmc_job_wait(store job, 0): already finished");
    EXPECT(lmc_job_wait(&result, job, (int64_t)1 << 40), LMC_OK,
           "lmc_job_wait(store job, 2^40 ms): a bound beyond Task.Wait's int range is valid");
    report(result == NTOK, "store job result = %lld (want %d)", (long long)result, NTOK);
    lmc_job_destroy(job);
  }
  expect_lookup(e, tokens, NTOK, "a", NTOK, "lookup after lmc_store_async");

  kv_fill(&dst, GUARD_VALUE);
  kv_copy(&expect, &dst);
  apply_retrieve(&expect, &src, slots, slots2, 3, NTOK, MAXL);
  EXPECT(kv_register(e, &dst, MAXL), LMC_OK, "register the destination layers");
  job = NULL;
  n = SENTINEL_I64;
  if (EXPECT(lmc_retrieve_async(&job, &n, e, tokens, slots2, NTOK, 3, (const uint8_t *)"a", 1, NULL), LMC_OK,
             "lmc_retrieve_async, host layers, default stream")) {
    report(n == NTOK, "lmc_retrieve_async: retrieved_tokens_out = %lld (want %d)", (long long)n, NTOK);
    result = SENTINEL_I64;
    EXPECT(lmc_job_wait(&result, job, -1), LMC_OK, "lmc_job_wait(retrieve job, -1)");
    report(result == NTOK, "retrieve job result = %lld (want %d)", (long long)result, NTOK);
    where[0] = '\0';
    ok = kv_equal(&dst, &expect, where, sizeof where);
    report(ok, "lmc_retrieve_async wrote exactly tokens [3, %d) into their slots, guards intact%s%s", NTOK,
           ok ? "" : ": ", where);
    lmc_job_destroy(job);
    lmc_job_destroy(job); /* destroyed twice: a no-op */
    report(1, "lmc_job_destroy twice is a no-op");
  }
  if (get_stats(e, &st))
    report(st.store_requests == 1 && st.retrieve_requests == 1 && st.stored_tokens == NTOK,
           "async calls are counted like the synchronous ones (stores %llu, retrieves %llu, stored tokens %llu)",
           (unsigned long long)st.store_requests, (unsigned long long)st.retrieve_requests,
           (unsigned long long)st.stored_tokens);
  lmc_engine_destroy(e);
  kv_free(&src);
  kv_free(&dst);
  kv_free(&expect);
}

/* ---------------------------------------------------------------------------------------------- */

/* ---------------------------------------------------------------------------------------------- */
/* Lower tiers, flush, per-tier stats and prefetch jobs                                            */
/* ---------------------------------------------------------------------------------------------- */

static void test_tiers_and_jobs(void) {
  char dir[] = "/tmp/lmcn-smoke-XXXXXX";
  char config[256];
  lmc_engine *e;
  kvbuf src, dst, expect;
  int32_t tok[NTOK];
  int64_t slots[NTOK], result = SENTINEL_I64;
  int32_t count = -1;
  lmc_tier_stats ts;
  lmc_job *job = NULL, *stale;
  lmc_status s;
  char where[128];
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
  make_slots(slots, NTOK, 7, 1);
  EXPECT(kv_register(e, &src, 2), LMC_OK, "register_layers [tiers]");
  expect_store(e, tok, slots, NTOK, 0, NULL, NTOK, "into CPU, written behind to disk");
  EXPECT(lmc_engine_flush(e, -1), LMC_OK, "lmc_engine_flush(-1) waits for the disk writes");
  EXPECT_MSG(lmc_engine_flush(e, -2), LMC_E_INVALID_ARGUMENT, "timeout_ms", "lmc_engine_flush(-2)");

  s = lmc_engine_tier_count(&count, e);
  report(s == LMC_OK && count == 1, "lmc_engine_tier_count -> %s, %d (want 1)", sname(s), (int)count);
  EXPECT_MSG(lmc_engine_tier_count(NULL, e), LMC_E_INVALID_ARGUMENT, "count_out", "tier_count(NULL)");
  memset(&ts, 0, sizeof ts);
  ts.struct_size = (uint32_t)sizeof ts;
  s = lmc_engine_get_tier_stats(e, 0, &ts);
  report(s == LMC_OK && strcmp(ts.name, "LocalDiskBackend") == 0 && ts.writes == NTOK / CHUNK &&
             ts.bytes_written == NTOK * TOKEN_BYTES && ts.used_bytes > ts.bytes_written,
         "tier 0 stats: %s name %s writes %llu bytes_written %llu used %llu", sname(s), ts.name,
         (unsigned long long)ts.writes, (unsigned long long)ts.bytes_written,
         (unsigned long long)ts.used_bytes);
  EXPECT(lmc_engine_get_tier_stats(e, 1, &ts), LMC_E_NOT_FOUND, "tier stats index 1 of 1");
  EXPECT(lmc_engine_get_tier_stats(e, -1, &ts), LMC_E_NOT_FOUND, "tier stats index -1");
  EXPECT(lmc_engine_get_tier_stats(e, 0, NULL), LMC_E_INVALID_ARGUMENT, "tier stats NULL");
  ts.struct_size = 4;
  EXPECT(lmc_engine_get_tier_stats(e, 0, &ts), LMC_E_INVALID_ARGUMENT, "tier stats struct_size 4");

  /* Drop the CPU copies; a prefetch brings them back from disk. */
  EXPECT(lmc_engine_clear(e), LMC_OK, "clear the CPU tier");
  s = lmc_prefetch_start(&job, e, tok, NTOK, NULL, 0);
  EXPECT(s, LMC_OK, "lmc_prefetch_start");
  s = lmc_job_wait(&result, job, -1);
  report(s == LMC_OK && result == NTOK, "lmc_job_wait(-1) -> %s, %lld tokens in CPU (want %d)",
         sname(s), (long long)result, NTOK);
  result = SENTINEL_I64;
  s = lmc_job_wait(&result, job, 0);
  report(s == LMC_OK && result == NTOK, "lmc_job_wait(0) on a finished job -> %s, %lld", sname(s),
         (long long)result);
  EXPECT_MSG(lmc_job_wait(NULL, job, 0), LMC_E_INVALID_ARGUMENT, "result_out", "job_wait(NULL out)");
  EXPECT_MSG(lmc_job_wait(&result, job, -5), LMC_E_INVALID_ARGUMENT, "timeout_ms", "job_wait(-5)");
  stale = job;
  lmc_job_destroy(job);
  EXPECT(lmc_job_wait(&result, stale, 0), LMC_E_INVALID_HANDLE, "job_wait on a destroyed job");
  lmc_job_destroy(stale);
  lmc_job_destroy(NULL);
  report(1, "lmc_job_destroy twice and with NULL are no-ops");
  EXPECT(lmc_job_wait(&result, NULL, 0), LMC_E_INVALID_HANDLE, "job_wait(NULL job)");
  EXPECT_MSG(lmc_prefetch_start(NULL, e, tok, NTOK, NULL, 0), LMC_E_INVALID_ARGUMENT, "job_out",
             "prefetch_start(NULL job_out)");
  EXPECT_MSG(lmc_prefetch_start(&job, e, NULL, NTOK, NULL, 0), LMC_E_INVALID_ARGUMENT, "tokens",
             "prefetch_start(NULL tokens)");

  memset(&ts, 0, sizeof ts);
  ts.struct_size = (uint32_t)sizeof ts;
  s = lmc_engine_get_tier_stats(e, 0, &ts);
  report(s == LMC_OK && ts.hits == NTOK / CHUNK, "prefetch read %llu chunks from disk (want %d)",
         (unsigned long long)ts.hits, NTOK / CHUNK);

  /* The promoted chunks retrieve bit-exact into a second buffer. */
  kv_fill(&dst, GUARD_VALUE);
  kv_copy(&expect, &dst);
  apply_retrieve(&expect, &src, slots, slots, 0, NTOK, 2);
  EXPECT(kv_register(e, &dst, 2), LMC_OK, "register the destination [tiers]");
  s = lmc_retrieve(&result, e, tok, slots, NTOK, 0, NULL, 0);
  report(s == LMC_OK && result == NTOK && kv_equal(&dst, &expect, where, sizeof where),
         "retrieve after prefetch -> %s, %lld, bytes %s", sname(s), (long long)result, where);

  lmc_engine_destroy(e);
  EXPECT(lmc_engine_flush(e, 0), LMC_E_INVALID_HANDLE, "destroyed handle: lmc_engine_flush");
  EXPECT(lmc_engine_tier_count(&count, e), LMC_E_INVALID_HANDLE, "destroyed handle: tier_count");
  EXPECT(lmc_engine_get_tier_stats(e, 0, &ts), LMC_E_INVALID_HANDLE, "destroyed handle: tier stats");
  EXPECT(lmc_prefetch_start(&job, e, tok, NTOK, NULL, 0), LMC_E_INVALID_HANDLE,
         "destroyed handle: prefetch_start");
  kv_free(&src);
  kv_free(&dst);
  kv_free(&expect);
  {
    char command[300];
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    report(system(command) == 0, "remove the disk tier directory");
  }
}

/* ---------------------------------------------------------------------------------------------- */
/* Lookups across processes                                                                        */
/* ---------------------------------------------------------------------------------------------- */

/* Child side of test_lookup_channel: the tokens are the parent's (same seed). */
static int probe_remote_lookup(const char *path) {
  int32_t tok[NTOK];
  int64_t h1 = -1, h2 = -1, h3 = -1;
  lmc_status a, b, c;
  make_tokens(tok, NTOK, 12);
  a = lmc_remote_lookup(&h1, path, tok, NTOK, (const uint8_t *)"salt", 4, 2000);
  b = lmc_remote_lookup(&h2, path, tok, NTOK, NULL, 0, 2000);
  c = lmc_remote_lookup(&h3, path, tok, 12, (const uint8_t *)"salt", 4, -1);
  return a == LMC_OK && h1 == 16 && b == LMC_OK && h2 == 0 && c == LMC_OK && h3 == 8 ? 0 : 1;
}

static void test_lookup_channel(void) {
  char path[64];
  lmc_engine *e = create_engine("{\"chunk_size\": 8, \"max_local_cpu_size\": 0.01}", "lookup server");
  kvbuf src;
  int32_t tok[NTOK];
  int64_t slots[NTOK], hit = SENTINEL_I64;
  lmc_status s;
  pid_t child;
  int status = 0;
  if (!e) return;
  snprintf(path, sizeof path, "/tmp/lmcn-smoke-%d.sock", (int)getpid());
  kv_alloc(&src);
  kv_pattern(&src, 31);
  make_tokens(tok, NTOK, 12);
  make_slots(slots, NTOK, 5, 2);
  EXPECT(kv_register(e, &src, 2), LMC_OK, "register_layers [lookup server]");
  expect_store(e, tok, slots, 16, 0, "salt", 16, "two chunks with a salt");
  EXPECT(lmc_lookup_server_start(e, path), LMC_OK, "lmc_lookup_server_start(%s)", path);
  EXPECT_MSG(lmc_lookup_server_start(e, path), LMC_E_INVALID_ARGUMENT, "already", "start twice");
  EXPECT_MSG(lmc_lookup_server_start(e, NULL), LMC_E_INVALID_ARGUMENT, "socket_path", "start(NULL)");

  /* Ask from another process (a fresh exec of this program: no engine, no forked runtime). */
  {
    char *argv[] = {(char *)"smoke", (char *)"--probe", (char *)"remote-lookup", path, NULL};
    fflush(stdout);
    if (posix_spawn(&child, "/proc/self/exe", NULL, NULL, argv, environ) != 0) child = -1;
    if (child > 0) waitpid(child, &status, 0);
  }
  report(WIFEXITED(status) && WEXITSTATUS(status) == 0,
         "lmc_remote_lookup from a child process: hits 16 with the salt, 0 without, 8 for 12 tokens");

  s = lmc_remote_lookup(&hit, path, tok, NTOK, (const uint8_t *)"salt", 4, 2000);
  report(s == LMC_OK && hit == 16, "lmc_remote_lookup in-process -> %s, %lld", sname(s), (long long)hit);
  hit = SENTINEL_I64;
  EXPECT_MSG(lmc_remote_lookup(&hit, path, tok, NTOK, NULL, 0, 0), LMC_E_INVALID_ARGUMENT, "timeout_ms",
             "remote_lookup timeout 0");
  EXPECT_MSG(lmc_remote_lookup(NULL, path, tok, NTOK, NULL, 0, 100), LMC_E_INVALID_ARGUMENT,
             "hit_tokens_out", "remote_lookup(NULL out)");
  EXPECT_MSG(lmc_remote_lookup(&hit, NULL, tok, NTOK, NULL, 0, 100), LMC_E_INVALID_ARGUMENT,
             "socket_path", "remote_lookup(NULL path)");
  EXPECT_MSG(lmc_remote_lookup(&hit, path, NULL, NTOK, NULL, 0, 100), LMC_E_INVALID_ARGUMENT, "tokens",
             "remote_lookup(NULL tokens)");
  report(hit == SENTINEL_I64, "failed remote lookups leave hit_tokens_out untouched");

  EXPECT(lmc_lookup_server_stop(e), LMC_OK, "lmc_lookup_server_stop");
  EXPECT(lmc_lookup_server_stop(e), LMC_OK, "lmc_lookup_server_stop again (no-op)");
  report(access(path, F_OK) != 0, "the socket file is removed");
  EXPECT(lmc_remote_lookup(&hit, path, tok, NTOK, NULL, 0, 500), LMC_E_IO, "remote_lookup with no server");

  EXPECT(lmc_lookup_server_start(e, path), LMC_OK, "start again");
  lmc_engine_destroy(e);
  report(access(path, F_OK) != 0, "destroy stops the lookup server");
  EXPECT(lmc_lookup_server_start(e, path), LMC_E_INVALID_HANDLE, "destroyed handle: lookup_server_start");
  EXPECT(lmc_lookup_server_stop(e), LMC_E_INVALID_HANDLE, "destroyed handle: lookup_server_stop");
  kv_free(&src);
}

int main(int argc, char **argv) {
  if (argc >= 3 && strcmp(argv[1], "--probe") == 0) {
    if (strcmp(argv[2], "foreign-handle") == 0) return probe_foreign_handles();
    if (strcmp(argv[2], "no-driver") == 0) return probe_no_driver();
    if (argc == 4 && strcmp(argv[2], "remote-lookup") == 0) return probe_remote_lookup(argv[3]);
    fprintf(stderr, "unknown probe %s\n", argv[2]);
    return 2;
  }
  setvbuf(stdout, NULL, _IOLBF, 0);

  test_versions();
  test_status_names();
  test_last_error_basics();
  test_create();
  test_get_config();
  test_register_invalid();
  test_round_trip();
  test_unfull_chunk();
  test_eviction();
  test_layouts();
  test_threads();
  test_destroyed_handle();
  test_foreign_handles();
  test_cuda_layers();
  test_no_driver();
  test_async_transfers();
  test_tiers_and_jobs();
  test_lookup_channel();

  printf("# smoke: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed ? 1 : 0;
}
