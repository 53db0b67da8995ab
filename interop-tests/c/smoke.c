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
 * check, not the rest of the run.
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
      {-11, "LMC_E_UNKNOWN"},
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

