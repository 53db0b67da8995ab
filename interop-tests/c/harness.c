/*
 * harness.c — the shared test harness of the C interop tests; see harness.h.
 */
#include "harness.h"

#include <ctype.h>
#include <spawn.h>
#include <stdarg.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

int g_passed;
int g_failed;
char g_msg[2048];
int g_msg_was_null;

void harness_init(void) { setvbuf(stdout, NULL, _IOLBF, 0); }

int harness_finish(const char *area) {
  printf("# %s: %d passed, %d failed\n", area, g_passed, g_failed);
  fflush(stdout);
  return g_failed ? 1 : 0;
}

int report(int ok, const char *fmt, ...) {
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
  return ok;
}

void note(const char *fmt, ...) {
  va_list ap;
  printf("# ");
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  putchar('\n');
  fflush(stdout);
}

const char *sname(lmc_status s) {
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

int contains_ci(const char *hay, const char *needle) {
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

void capture_message(void) {
  const char *m = lmc_last_error_message();
  g_msg_was_null = (m == NULL);
  snprintf(g_msg, sizeof g_msg, "%s", m ? m : "");
}

int expectf(lmc_status got, lmc_status want, const char *needle, const char *fmt, ...) {
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
           !ok_msg ? (got == LMC_OK ? " [should be empty after success]" : " [should say why]")
                   : "",
           !ok_needle ? " [should name " : "", !ok_needle ? needle : "");
    if (!ok_needle) printf("#   (message does not contain \"%s\")\n", needle);
  }
  return ok_status && ok_msg && ok_needle;
}

/* ---------------------------------------------------------------------------------------------- */
/* KV buffers                                                                                      */
/* ---------------------------------------------------------------------------------------------- */

void kv_alloc(kvbuf *b) {
  int l;
  for (l = 0; l < MAXL; l++) {
    b->mem[l] = (uint16_t *)malloc(BUF_ELEMS * sizeof(uint16_t));
    if (!b->mem[l]) {
      fprintf(stderr, "out of memory\n");
      exit(2);
    }
  }
}

void kv_free(kvbuf *b) {
  int l;
  for (l = 0; l < MAXL; l++) free(b->mem[l]);
}

uint16_t *kv_base(const kvbuf *b, int layer) { return b->mem[layer] + GUARD; }

void kv_fill(kvbuf *b, uint16_t v) {
  int l;
  size_t i;
  for (l = 0; l < MAXL; l++)
    for (i = 0; i < BUF_ELEMS; i++) b->mem[l][i] = v;
}

void kv_pattern(kvbuf *b, unsigned seed) {
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

void kv_copy(kvbuf *dst, const kvbuf *src) {
  int l;
  for (l = 0; l < MAXL; l++) memcpy(dst->mem[l], src->mem[l], BUF_ELEMS * sizeof(uint16_t));
}

size_t nhd_index(int kv, int64_t slot, int h, int d) {
  int64_t block = slot / BS, tok = slot % BS;
  return (size_t)(kv * KV_STRIDE + block * BLOCK_STRIDE + tok * TOK_STRIDE + h * HD + d);
}

int kv_equal(const kvbuf *a, const kvbuf *b, char *where, size_t where_len) {
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

void apply_retrieve(kvbuf *expect, const kvbuf *src, const int64_t *src_slots,
                    const int64_t *dst_slots, int64_t first, int64_t retrieved, int nlayers) {
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

int expect_untouched(const kvbuf *buf, const kvbuf *before, const char *what) {
  char where[256];
  int same;
  where[0] = '\0';
  same = kv_equal(buf, before, where, sizeof where);
  return report(same, "%s: KV memory untouched%s%s", what,
                where[0] ? " -- first difference at " : "", where);
}

lmc_kv_layer_desc nhd_desc(const void *base) {
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

lmc_status kv_register(lmc_engine *e, const kvbuf *b, int nlayers) {
  lmc_kv_layer_desc descs[MAXL];
  int l;
  for (l = 0; l < nlayers; l++) descs[l] = nhd_desc(kv_base(b, l));
  return lmc_engine_register_layers(e, descs, nlayers);
}

/* ---------------------------------------------------------------------------------------------- */
/* Requests and results                                                                            */
/* ---------------------------------------------------------------------------------------------- */

void make_tokens(int32_t *tokens, int n, int32_t seed) {
  int i;
  for (i = 0; i < n; i++) tokens[i] = seed * 1000 + i * 7 + 1;
}

void make_slots(int64_t *slots, int n, int mul, int add) {
  int i;
  for (i = 0; i < n; i++) slots[i] = (int64_t)((i * mul + add) % NSLOTS);
}

void table_to_slots(const int32_t *block_ids, int64_t num_block_ids, int32_t table_block_size,
                    int64_t num_tokens, int64_t *slots_out) {
  int64_t t;
  for (t = 0; t < num_tokens; t++) {
    int64_t b = t / table_block_size;
    if (b >= num_block_ids || block_ids[b] == -1)
      slots_out[t] = -1;
    else
      slots_out[t] = (int64_t)block_ids[b] * table_block_size + t % table_block_size;
  }
}

lmc_request req_tokens(const int32_t *tokens, int64_t n, const char *key) {
  lmc_request r;
  memset(&r, 0, sizeof r);
  r.struct_size = (uint32_t)sizeof r;
  r.destination_kind = LMC_DESTINATION_SLOTS;
  r.tokens = tokens;
  r.num_tokens = n;
  r.extra_key = (const uint8_t *)key;
  r.extra_key_len = key ? (int64_t)strlen(key) : 0;
  return r;
}

lmc_request req_slots(const int32_t *tokens, int64_t n, const int64_t *slots, int64_t first,
                      const char *key) {
  lmc_request r = req_tokens(tokens, n, key);
  r.slot_mapping = slots;
  r.first_token = first;
  return r;
}

lmc_request req_table(const int32_t *tokens, int64_t n, const int32_t *block_ids,
                      int64_t num_block_ids, int32_t table_block_size, int64_t first,
                      const char *key) {
  lmc_request r = req_tokens(tokens, n, key);
  r.destination_kind = LMC_DESTINATION_BLOCK_TABLE;
  r.block_ids = block_ids;
  r.num_block_ids = num_block_ids;
  r.table_block_size = table_block_size;
  r.first_token = first;
  return r;
}

lmc_transfer_result tr_blank(void) {
  lmc_transfer_result r;
  memset(&r, 0xAB, sizeof r);
  r.struct_size = (uint32_t)sizeof r;
  return r;
}

lmc_lookup_result lr_blank(void) {
  lmc_lookup_result r;
  memset(&r, 0xAB, sizeof r);
  r.struct_size = (uint32_t)sizeof r;
  return r;
}

int tr_is_blank(const lmc_transfer_result *r) {
  lmc_transfer_result b = tr_blank();
  return memcmp(&b, r, sizeof b) == 0;
}

int lr_is_blank(const lmc_lookup_result *r) {
  lmc_lookup_result b = lr_blank();
  return memcmp(&b, r, sizeof b) == 0;
}

int tr_same_work(const lmc_transfer_result *a, const lmc_transfer_result *b) {
  int i;
  if (a->struct_size != b->struct_size || a->tokens_matched != b->tokens_matched ||
      a->tokens_copied != b->tokens_copied || a->bytes_copied != b->bytes_copied ||
      a->chunks_skipped_for_space != b->chunks_skipped_for_space)
    return 0;
  for (i = 0; i < LMC_MAX_TIERS; i++)
    if (a->chunks_by_tier[i] != b->chunks_by_tier[i]) return 0;
  return 1;
}

const char *tr_str(const lmc_transfer_result *r) {
  static char buf[4][256];
  static int next;
  char *s = buf[next++ & 3];
  snprintf(s, 256, "{matched %lld copied %lld bytes %lld skipped %lld tiers [%lld %lld %lld %lld] elapsed %lld}",
           (long long)r->tokens_matched, (long long)r->tokens_copied, (long long)r->bytes_copied,
           (long long)r->chunks_skipped_for_space, (long long)r->chunks_by_tier[0],
           (long long)r->chunks_by_tier[1], (long long)r->chunks_by_tier[2],
           (long long)r->chunks_by_tier[3], (long long)r->elapsed_ns);
  return s;
}

const char *lr_str(const lmc_lookup_result *r) {
  static char buf[4][200];
  static int next;
  char *s = buf[next++ & 3];
  snprintf(s, 200, "{hit %lld tiers [%lld %lld %lld %lld] elapsed %lld}", (long long)r->hit_tokens,
           (long long)r->tokens_by_tier[0], (long long)r->tokens_by_tier[1],
           (long long)r->tokens_by_tier[2], (long long)r->tokens_by_tier[3],
           (long long)r->elapsed_ns);
  return s;
}

int check_tr(const lmc_transfer_result *r, int64_t matched, int64_t copied, int64_t tier0,
             int64_t token_bytes, const char *what) {
  char want[200];
  int ok = 1, i;
  if (matched != ANY && r->tokens_matched != matched) ok = 0;
  if (copied != ANY && r->tokens_copied != copied) ok = 0;
  if (tier0 != ANY && r->chunks_by_tier[0] != tier0) ok = 0;
  if (r->bytes_copied != r->tokens_copied * token_bytes) ok = 0;
  if (r->elapsed_ns < 0 || r->chunks_skipped_for_space < 0 || r->tokens_copied < 0) ok = 0;
  for (i = 0; i < LMC_MAX_TIERS; i++)
    if (r->chunks_by_tier[i] < 0) ok = 0;
  snprintf(want, sizeof want, "want matched %s%lld, copied %s%lld, bytes = copied x %lld, tiers[0] %s%lld",
           matched == ANY ? "any " : "", matched == ANY ? 0LL : (long long)matched,
           copied == ANY ? "any " : "", copied == ANY ? 0LL : (long long)copied,
           (long long)token_bytes, tier0 == ANY ? "any " : "", tier0 == ANY ? 0LL : (long long)tier0);
  return report(ok, "%s: result %s (%s)", what, tr_str(r), want);
}

lmc_engine *create_engine(const char *config, const char *what) {
  lmc_engine *e = NULL;
  lmc_status s = lmc_engine_create(&e, config, "smoke-model", 1, 0);
  EXPECT(s, LMC_OK, "lmc_engine_create(%s) for %s", config ? config : "NULL", what);
  return s == LMC_OK ? e : NULL;
}

int get_stats(lmc_engine *e, lmc_stats *st) {
  memset(st, 0, sizeof *st);
  st->struct_size = (uint32_t)sizeof *st;
  return lmc_engine_get_stats(e, st) == LMC_OK;
}

uint64_t d64(uint64_t after, uint64_t before) { return after - before; }

int64_t lookup_n(lmc_engine *e, const int32_t *tokens, int64_t n, const char *key,
                 lmc_status *status) {
  lmc_lookup_result r = lr_blank();
  lmc_request q = req_tokens(tokens, n, key);
  *status = lmc_lookup(&r, e, &q);
  return *status == LMC_OK ? r.hit_tokens : SENTINEL_I64;
}

void expect_lookup(lmc_engine *e, const int32_t *tokens, int64_t n, const char *key, int64_t want,
                   const char *what) {
  lmc_lookup_result r = lr_blank();
  lmc_request q = req_tokens(tokens, n, key);
  lmc_status s = lmc_lookup(&r, e, &q);
  int tiers_ok;
  capture_message();
  tiers_ok = r.tokens_by_tier[0] + r.tokens_by_tier[1] + r.tokens_by_tier[2] +
                 r.tokens_by_tier[3] == r.hit_tokens &&
             r.tokens_by_tier[1] >= 0 && r.tokens_by_tier[2] >= 0 && r.tokens_by_tier[3] >= 0 &&
             r.tokens_by_tier[0] >= 0 && r.elapsed_ns >= 0;
  report(s == LMC_OK && r.hit_tokens == want && tiers_ok && g_msg[0] == '\0',
         "lookup %s (%d tokens%s%s) -> %s, %s (want hit %lld, tiers adding up to it)%s%.200s", what,
         (int)n, key ? ", key " : "", key ? key : "", sname(s), s == LMC_OK ? lr_str(&r) : "",
         (long long)want, s != LMC_OK ? ": " : "", g_msg);
}

lmc_transfer_result expect_store(lmc_engine *e, const int32_t *tokens, const int64_t *slots,
                                 int64_t n, int64_t skip, const char *key, int64_t want,
                                 const char *what) {
  lmc_transfer_result r = tr_blank();
  lmc_request q = req_slots(tokens, n, slots, skip, key);
  lmc_status s = lmc_store(&r, e, &q, NULL);
  capture_message();
  report(s == LMC_OK && r.tokens_matched == want && g_msg[0] == '\0' && r.tokens_copied >= 0 &&
             r.tokens_copied <= r.tokens_matched && r.elapsed_ns >= 0,
         "store %s (%d tokens, skip %d) -> %s, %s (want matched %lld)%s%.200s", what, (int)n,
         (int)skip, sname(s), s == LMC_OK ? tr_str(&r) : "", (long long)want,
         s != LMC_OK ? ": " : "", g_msg);
  return r;
}

lmc_transfer_result retrieve_and_verify(lmc_engine *e, kvbuf *dst, const kvbuf *src, const lmc_request *req,
                         const int64_t *src_slots, int64_t want_retrieved, int64_t want_copied,
                         const char *what) {
  kvbuf expect;
  lmc_transfer_result r = tr_blank();
  int64_t *dst_slots = NULL;
  char where[256];
  int same;
  lmc_status s;
  kv_alloc(&expect);
  kv_fill(dst, GUARD_VALUE);
  kv_copy(&expect, dst);
  s = lmc_retrieve(&r, e, req, NULL);
  capture_message();
  report(s == LMC_OK && r.tokens_matched == want_retrieved &&
             (want_copied == ANY || r.tokens_copied == want_copied) &&
             r.bytes_copied == r.tokens_copied * (int64_t)TOKEN_BYTES,
         "retrieve %s (%d tokens, first_token %d, %s) -> %s, %s (want matched %lld, copied %lld, "
         "bytes = copied x %d)%s%s",
         what, (int)req->num_tokens, (int)req->first_token,
         req->destination_kind == LMC_DESTINATION_BLOCK_TABLE ? "block table" : "slot mapping",
         sname(s), s == LMC_OK ? tr_str(&r) : "", (long long)want_retrieved,
         (long long)want_copied, (int)TOKEN_BYTES, s != LMC_OK ? ": " : "", g_msg);
  if (s == LMC_OK && req->num_tokens > 0) {
    dst_slots = (int64_t *)malloc((size_t)req->num_tokens * sizeof(int64_t));
    if (!dst_slots) exit(2);
    if (req->destination_kind == LMC_DESTINATION_BLOCK_TABLE)
      table_to_slots(req->block_ids, req->num_block_ids, req->table_block_size, req->num_tokens,
                     dst_slots);
    else
      memcpy(dst_slots, req->slot_mapping, (size_t)req->num_tokens * sizeof(int64_t));
    apply_retrieve(&expect, src, src_slots, dst_slots, req->first_token, r.tokens_matched, MAXL);
    free(dst_slots);
  }
  where[0] = '\0';
  same = kv_equal(dst, &expect, where, sizeof where);
  report(same, "retrieve %s: destination bit-exact, other slots and guards untouched%s%s", what,
         where[0] ? " -- first difference at " : "", where);
  kv_free(&expect);
  return r;
}

int json_int(const char *json, const char *key, long long *value) {
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

int spawn_probe(const char *probe, const char *arg, char **env) {
  char *argv[5];
  pid_t pid;
  int status = 0;
  argv[0] = (char *)"lmc-test";
  argv[1] = (char *)"--probe";
  argv[2] = (char *)probe;
  argv[3] = (char *)arg;
  argv[4] = NULL;
  fflush(stdout);
  if (posix_spawn(&pid, "/proc/self/exe", NULL, NULL, argv, env ? env : environ) != 0) return -1;
  if (waitpid(pid, &status, 0) != pid) return -1;
  return status;
}

void report_probe(int status, const char *what) {
  if (status == -1)
    report(0, "%s: could not start the child process", what);
  else if (WIFSIGNALED(status))
    report(0, "%s: child killed by signal %d (the library crashed)", what, WTERMSIG(status));
  else
    report(WEXITSTATUS(status) == 0, "%s (child exit %d)", what, WEXITSTATUS(status));
}
