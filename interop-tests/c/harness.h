/*
 * harness.h — the shared test harness of the C interop tests (interop-tests/c/test_*.c).
 *
 * Every test_*.c file is one area of the C ABI with its own main(), built with harness.c as C99
 * with -Wall -Wextra -Werror -pedantic and runnable alone:
 *
 *     test_transfer                 runs the area's checks
 *     test_transfer --probe NAME …  internal: a child process the area starts (a crash must cost one
 *                                   check, not the rest of the run; some environment is per process)
 *
 * Output: one "ok - …" / "not ok - …" line per check, then "# <area>: N passed, M failed".
 * Exit status: 0 when every check passed, 1 otherwise.
 *
 * KV memory: host buffers in FlashAttention NHD layout [2, B, N, H, D] with 16-bit elements and
 * guard regions around each layer; round trips are compared bit for bit, guards included.
 */
#ifndef LMC_TEST_HARNESS_H
#define LMC_TEST_HARNESS_H

#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include "lmcache_native.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__)
#define LMC_TEST_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define LMC_TEST_PRINTF(f, a)
#endif

/* ---------------------------------------------------------------------------------------------- */
/* Reporting                                                                                       */
/* ---------------------------------------------------------------------------------------------- */

extern int g_passed;
extern int g_failed;
/* The thread's last error message, copied by capture_message() / expectf(). */
extern char g_msg[2048];
extern int g_msg_was_null;

/* Line-buffered stdout; call first in main. */
void harness_init(void);
/* Prints "# <area>: N passed, M failed"; returns main's exit status. */
int harness_finish(const char *area);

/* One check line: "ok - …" or "not ok - …". Returns ok. */
int report(int ok, const char *fmt, ...) LMC_TEST_PRINTF(2, 3);
/* A comment line "# …" (never counted). */
void note(const char *fmt, ...) LMC_TEST_PRINTF(1, 2);

/* Our own status names, so that printing a result never calls into the library under test. */
const char *sname(lmc_status s);
/* Case-insensitive substring search (strcasestr is a GNU extension). */
int contains_ci(const char *hay, const char *needle);
/* Copies lmc_last_error_message() into g_msg (it is only valid until the next lmc_* call). */
void capture_message(void);

/*
 * Checks the status a call just returned together with the thread's message: "" after LMC_OK,
 * non-empty after a failure, and containing `needle` (case-insensitive) when it is not NULL.
 * Must be called before any other lmc_* call. One output line. Returns 1 when everything held.
 */
int expectf(lmc_status got, lmc_status want, const char *needle, const char *fmt, ...)
    LMC_TEST_PRINTF(4, 5);

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
/* KV bytes of one token in one layer (K and V, H x D, 2 bytes) and over all MAXL layers. */
#define LAYER_TOKEN_BYTES ((int64_t)2 * NH * HD * 2)
#define TOKEN_BYTES ((uint64_t)MAXL * LAYER_TOKEN_BYTES)
#define CHUNK_BYTES (TOKEN_BYTES * CHUNK)

#define GUARD_VALUE ((uint16_t)0xA5A5)

typedef struct kvbuf {
  uint16_t *mem[MAXL]; /* BUF_ELEMS each; the layer starts at mem + GUARD */
} kvbuf;

void kv_alloc(kvbuf *b);
void kv_free(kvbuf *b);
uint16_t *kv_base(const kvbuf *b, int layer);
void kv_fill(kvbuf *b, uint16_t v);
/* Distinct, seed-dependent content in every element; guards keep GUARD_VALUE. */
void kv_pattern(kvbuf *b, unsigned seed);
void kv_copy(kvbuf *dst, const kvbuf *src);
/* Element index of (kv, slot, head, d) inside a layer, NHD. */
size_t nhd_index(int kv, int64_t slot, int h, int d);
/* Describes the first difference between two buffers; returns 1 when they are equal. */
int kv_equal(const kvbuf *a, const kvbuf *b, char *where, size_t where_len);
/* Applies to `expect` what a retrieve of tokens [first, retrieved) should have written. */
void apply_retrieve(kvbuf *expect, const kvbuf *src, const int64_t *src_slots,
                    const int64_t *dst_slots, int64_t first, int64_t retrieved, int nlayers);
/* One check: `buf` equals `before` bit for bit. */
int expect_untouched(const kvbuf *buf, const kvbuf *before, const char *what);

lmc_kv_layer_desc nhd_desc(const void *base);
lmc_status kv_register(lmc_engine *e, const kvbuf *b, int nlayers);

/* ---------------------------------------------------------------------------------------------- */
/* Requests and results                                                                            */
/* ---------------------------------------------------------------------------------------------- */

#define NTOK 24 /* three chunks of CHUNK tokens */
#define SENTINEL_I64 ((int64_t)-777)
#define SENTINEL_ENGINE ((lmc_engine *)(uintptr_t)0x5e47)
#define SENTINEL_JOB ((lmc_job *)(uintptr_t)0x70b)

void make_tokens(int32_t *tokens, int n, int32_t seed);
/* Distinct slots: multiplying by a number coprime with NSLOTS permutes them. */
void make_slots(int64_t *slots, int n, int mul, int add);
/* Per-token slots of a block table (-1 for a block id of -1 and for tokens past the last block). */
void table_to_slots(const int32_t *block_ids, int64_t num_block_ids, int32_t table_block_size,
                    int64_t num_tokens, int64_t *slots_out);

/* A request with no destination (lookup, prefetch); key is a C string or NULL. */
lmc_request req_tokens(const int32_t *tokens, int64_t n, const char *key);
/* A request whose destination is a slot mapping. */
lmc_request req_slots(const int32_t *tokens, int64_t n, const int64_t *slots, int64_t first,
                      const char *key);
/* A request whose destination is a block table. */
lmc_request req_table(const int32_t *tokens, int64_t n, const int32_t *block_ids,
                      int64_t num_block_ids, int32_t table_block_size, int64_t first,
                      const char *key);

/* struct_size set, every other byte 0xAB (so that untouched fields are visible). */
lmc_transfer_result tr_blank(void);
lmc_lookup_result lr_blank(void);
/* 1 when the whole struct still holds tr_blank()'s bytes. */
int tr_is_blank(const lmc_transfer_result *r);
int lr_is_blank(const lmc_lookup_result *r);
/* Equal ignoring elapsed_ns. */
int tr_same_work(const lmc_transfer_result *a, const lmc_transfer_result *b);
/* "matched 24 copied 24 bytes 3072 skipped 0 tiers [3 0 0 0] elapsed 1234" */
const char *tr_str(const lmc_transfer_result *r);
const char *lr_str(const lmc_lookup_result *r);

/* Checks a transfer result field by field in one line; a want of ANY is not checked.
 * bytes_copied must always be tokens_copied * token_bytes, chunks_by_tier >= 0, elapsed_ns >= 0. */
#define ANY ((int64_t)INT64_MIN)
int check_tr(const lmc_transfer_result *r, int64_t matched, int64_t copied, int64_t tier0,
             int64_t token_bytes, const char *what);

lmc_engine *create_engine(const char *config, const char *what);
int get_stats(lmc_engine *e, lmc_stats *st);
uint64_t d64(uint64_t after, uint64_t before);

/* lmc_lookup; returns the hit (SENTINEL_I64 when it failed). */
int64_t lookup_n(lmc_engine *e, const int32_t *tokens, int64_t n, const char *key,
                 lmc_status *status);
/* lookup and check the hit count (and tokens_by_tier[0] == hit, the rest 0) in one check line. */
void expect_lookup(lmc_engine *e, const int32_t *tokens, int64_t n, const char *key, int64_t want,
                   const char *what);
/* Synchronous store with a slot mapping; checks tokens_matched == want (and the result's
 * consistency) in one line. Returns the result (tr_blank() on failure). */
lmc_transfer_result expect_store(lmc_engine *e, const int32_t *tokens, const int64_t *slots,
                                 int64_t n, int64_t skip, const char *key, int64_t want,
                                 const char *what);
/* Retrieves into `dst` (guard-filled, registered) with the given request and compares with the
 * expected bytes (tokens [first, got) of src at src_slots written to the request's slots).
 * Returns the result (tr_blank() on failure). */
lmc_transfer_result retrieve_and_verify(lmc_engine *e, kvbuf *dst, const kvbuf *src, const lmc_request *req,
                         const int64_t *src_slots, int64_t want_retrieved, int64_t want_copied,
                         const char *what);

/* Extracts the integer value of "key" from a JSON text, loosely. Returns 1 when found. */
int json_int(const char *json, const char *key, long long *value);

/* Runs this program again as `<self> --probe <probe> [arg]` (env NULL: this environment) and
 * returns its wait status, or -1 when it could not start. */
int spawn_probe(const char *probe, const char *arg, char **env);
/* One check line from a probe's wait status (exit 0 = pass). */
void report_probe(int status, const char *what);

#endif /* LMC_TEST_HARNESS_H */
