/*
 * fuzz_exports.c — libFuzzer harness over every function of include/lmcache_native.h.
 *
 * Built and run by interop-tests/fuzz/run.sh (clang-14 -fsanitize=fuzzer, linked against the
 * published liblmcache_native.so, which is not instrumented: coverage is this file's own).
 *
 * The input is a little program: a byte picks an operation, the following bytes its arguments
 * (handles of every kind and lifetime, config JSON, layer descriptions, token counts, slots, extra
 * keys, timeouts, struct sizes, socket paths). Running out of bytes reads zeros, so every input is a
 * valid program. Engines, jobs and layer memory live for one input; everything is destroyed and
 * freed at its end.
 *
 * Memory safety of the harness itself: every pointer handed to the library points into memory this
 * file owns and every length passed with a non-NULL pointer is at most that memory's size (a layer's
 * base_address lies inside its buffer and span_bytes never reaches past it). Lies are told only with
 * NULL pointers, where any length is fair.
 *
 * Invariants (a violation prints the call and calls abort(), which libFuzzer records as a crash):
 *  I1  no call returns LMC_E_INTERNAL (-10): that is a bug by the header's definition;
 *  I2  every status is one of the header's pinned values (0 .. -11);
 *  I3  lmc_last_error_message() is never NULL; "" after a success, non-empty after a failure;
 *  I4  handles: an engine function given anything but a live engine (a job, a destroyed engine, NULL,
 *      a made-up number) returns LMC_E_INVALID_HANDLE, a job function likewise, and a live handle is
 *      never refused; destroying a handle of the wrong kind affects nothing (every live engine and
 *      job still answers afterwards); no handle number is ever handed out twice (engines and jobs
 *      share no numbers; destroyed numbers are not reused). One exception: a live job whose engine
 *      was destroyed may fail with the engine's LMC_E_INVALID_HANDLE (lmc_job_wait returns "the
 *      status the job itself failed with"; the message names the engine);
 *  I5  store then retrieve of a fresh request (its extra key ends with a counter) on one engine, with
 *      the same tokens, destination (slots or block table) and key, synchronous or as jobs, returns
 *      bit for bit the KV that was stored (for tokens in [first_token, min(retrieved, stored))),
 *      never more tokens than stored, and writes nothing else in the harness's layer memory;
 *  I6  no library call writes outside a layer's span (guard bytes around every layer buffer), outside
 *      an output buffer's capacity or past a struct's struct_size, nor into result_out when job_out
 *      is given;
 *  I7  out-parameters are left untouched on failure (needed_out excepted on BUFFER_TOO_SMALL), and
 *      counts returned on success are within [0, num_tokens];
 *  I8  lmc_lookup_server_start never deletes a file that is not a socket;
 *  I9  a block-table store/retrieve and the same with the slot mapping the table expands into give
 *      the same statuses, results (elapsed_ns aside) and KV bytes (op_twin);
 *  I10 statuses pinned for requests: LMC_OK for one the header accepts, LMC_E_INVALID_ARGUMENT for
 *      one it refuses (request_valid), on a live engine with a usable result struct;
 *  I11 jobs: an accepted request's job finishes with LMC_OK; a finished job never times out and gives
 *      the same status and result every time; lmc_job_poll's answer is 0 or 1 and never goes back.
 * (README.md lists them in full.)
 */
#define _GNU_SOURCE
#include "lmcache_native.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---------------------------------------------------------------------------------------------- */
/* Bounds                                                                                          */
/* ---------------------------------------------------------------------------------------------- */

#define MAX_OPS 48               /* operations per input */
#define MAX_ENGINES 4            /* live engines at once */
#define MAX_JOBS 16              /* live jobs at once */
#define MAX_DEAD 32              /* destroyed handles remembered per input */
#define MAX_TOKENS 4096          /* tokens per call when the pointer is real */
#define MAX_LAYERS 8             /* layers per registration */
#define LAYER_MEMORY_BUDGET (8u << 20) /* bytes of layer memory per input */
#define GUARD 256                /* guard bytes before and after every layer buffer */
#define EXTRA_KEY_MAX 4096
#define DESC_STRIDE_MAX 4104     /* largest struct_size given for lmc_kv_layer_desc */
#define STRUCT_BUF 8192          /* stats / tier stats buffers (struct_size given is <= this) */
#define CONFIG_BUF 65536
#define CANARY 0xCB
#define GUARD_BYTE 0xE7
#define BIG_REGION ((size_t)1 << 31) /* read-only zero pages for extra keys near Array.MaxLength */

/* ---------------------------------------------------------------------------------------------- */
/* Input reader                                                                                    */
/* ---------------------------------------------------------------------------------------------- */

typedef struct {
  const uint8_t *p;
  size_t n;
} reader;

static uint8_t u8(reader *r) {
  if (r->n == 0) return 0;
  r->n--;
  return *r->p++;
}
static uint16_t u16(reader *r) { return (uint16_t)(u8(r) | (u8(r) << 8)); }
static uint32_t u32(reader *r) { return (uint32_t)u16(r) | ((uint32_t)u16(r) << 16); }
static uint64_t u64(reader *r) { return (uint64_t)u32(r) | ((uint64_t)u32(r) << 32); }

static const int64_t k_interesting64[] = {
    0, 1, -1, 2, -2, 7, 8, 15, 16, 17, 255, 256, 257, 1000, 4095, 4096, 4097, 65535, 65536,
    INT32_MAX, (int64_t)INT32_MAX + 1, INT32_MIN, (int64_t)INT32_MIN - 1, 0x7FFFFFC7, 0x7FFFFFC8,
    UINT32_MAX, (int64_t)UINT32_MAX + 1, (int64_t)1 << 40, (int64_t)1 << 53, ((int64_t)1 << 53) + 1,
    300000000000000LL /* 3e14 ms */, 1000000000000000LL /* 1e15 ms */, 922337203685477LL,
    922337203685478LL /* TimeSpan.MaxValue in ms, and one more */, 1000000000000000000LL, INT64_MAX,
    INT64_MAX - 1, INT64_MIN, INT64_MIN + 1, -1000, -4096, -3000000000LL,
};
#define N_INTERESTING64 (sizeof k_interesting64 / sizeof k_interesting64[0])

static const int32_t k_interesting32[] = {0, 1, -1, 2, 3, 4, 7, 8, 16, 64, 255, 256, 4096, 65535, 65536,
                                          INT32_MAX, INT32_MAX - 1, INT32_MIN, INT32_MIN + 1, -2};
#define N_INTERESTING32 (sizeof k_interesting32 / sizeof k_interesting32[0])

static int64_t any64(reader *r) {
  uint8_t sel = u8(r);
  if (sel < 200) return k_interesting64[sel % N_INTERESTING64];
  return (int64_t)u64(r);
}
static int32_t any32(reader *r) {
  uint8_t sel = u8(r);
  if (sel < 200) return k_interesting32[sel % N_INTERESTING32];
  return (int32_t)u32(r);
}
/* A timeout: mostly small, sometimes anything. */
static int64_t timeout_ms(reader *r) {
  uint8_t sel = u8(r);
  if (sel < 96) return (int64_t)(sel % 4) - 1; /* -1, 0, 1, 2 */
  if (sel < 128) return 50;
  return any64(r);
}

/* xorshift64*: cheap fill patterns seeded from the input. */
static uint64_t rng_next(uint64_t *s) {
  uint64_t x = *s ? *s : 0x9E3779B97F4A7C15ull;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *s = x;
  return x * 0x2545F4914F6CDD1Dull;
}
static void fill_random(uint8_t *p, size_t n, uint64_t seed) {
  uint64_t s = seed | 1;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t v = rng_next(&s);
    memcpy(p + i, &v, 8);
  }
  for (; i < n; i++) p[i] = (uint8_t)rng_next(&s);
}

/* ---------------------------------------------------------------------------------------------- */
/* Failure reporting                                                                               */
/* ---------------------------------------------------------------------------------------------- */

static char g_call[1024]; /* the call being made, with its arguments */
static int g_trace;       /* LMC_FUZZ_TRACE=1: print every call and its status (for reproducing) */

static void set_call(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void set_call(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_call, sizeof g_call, fmt, ap);
  va_end(ap);
  if (g_trace) fprintf(stderr, "lmc-fuzz: %s\n", g_call);
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...) {
  va_list ap;
  fprintf(stderr, "\n==== lmc fuzz: INVARIANT VIOLATED ====\ncall: %s\n", g_call);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  fflush(stderr);
  abort();
}

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

/* I1-I3 for one status-returning call (g_call describes it). */
static void check_status(lmc_status st) {
  const char *msg = lmc_last_error_message();
  if (g_trace) fprintf(stderr, "lmc-fuzz:   -> %s %s\n", sname(st), msg ? msg : "(NULL message)");
  if (msg == NULL) die("lmc_last_error_message() returned NULL after status %d", st);
  if (st == LMC_E_INTERNAL) die("returned LMC_E_INTERNAL (-10): %s", msg);
  if (st > 0 || st < LMC_E_TIMEOUT) die("returned %d, not a status of the header; message: %s", st, msg);
  if (st == LMC_OK && msg[0] != '\0') die("LMC_OK but the last error message is not empty: %s", msg);
  if (st != LMC_OK && msg[0] == '\0') die("%s but the last error message is empty", sname(st));
}

/* ---------------------------------------------------------------------------------------------- */
/* Handles                                                                                         */
/* ---------------------------------------------------------------------------------------------- */

/* Every handle number the library handed out in this process (open addressing; cleared when it
 * gets large, which only weakens the never-reused check in very long runs). */
static uint64_t *g_seen;
static size_t g_seen_cap, g_seen_count;

static int seen_insert(uint64_t h) { /* 1 when new */
  if (g_seen_count * 2 >= g_seen_cap) {
    size_t ncap = g_seen_cap ? g_seen_cap * 2 : 4096;
    if (ncap > ((size_t)1 << 24)) { /* 16M entries: forget and start over */
      memset(g_seen, 0, g_seen_cap * sizeof *g_seen);
      g_seen_count = 0;
    } else {
      uint64_t *old = g_seen;
      size_t ocap = g_seen_cap;
      g_seen = calloc(ncap, sizeof *g_seen);
      if (!g_seen) die("out of memory");
      g_seen_cap = ncap;
      g_seen_count = 0;
      for (size_t i = 0; i < ocap; i++)
        if (old[i]) seen_insert(old[i]);
      free(old);
    }
  }
  size_t mask = g_seen_cap - 1, i = (size_t)((h * 0x9E3779B97F4A7C15ull) >> 17) & mask;
  while (g_seen[i]) {
    if (g_seen[i] == h) return 0;
    i = (i + 1) & mask;
  }
  g_seen[i] = h;
  g_seen_count++;
  return 1;
}

typedef struct {
  uint8_t *mem;      /* allocation: GUARD | region | GUARD */
  size_t region;     /* bytes usable by layers */
} layer_buf;

typedef struct {
  lmc_engine *h;
  int live;
  /* the registration the library accepted last (what store/retrieve use) */
  int nlayers;
  lmc_kv_layer_desc layers[MAX_LAYERS];
  layer_buf *cur;    /* buffer of that registration */
  layer_buf bufs[8]; /* every buffer given to this engine, kept until it is destroyed */
  int nbufs;
  int serving;       /* lookup server started (index into socket names) */
  int pending_jobs;  /* jobs started since the last barrier (see barrier()) */
} engine_slot;

typedef struct {
  lmc_job *h;
  int live;
  uint64_t engine; /* the engine it was started on */
  int op;          /* OP_STORE, OP_RETRIEVE or OP_PREFETCH */
  int64_t n, first, bpt; /* num_tokens, first_token, KV bytes per token of the registration */
  int finished;    /* poll said 1, or a wait / result answered */
  int has_result;  /* result holds the first full result it gave */
  lmc_transfer_result result;
} job_slot;

static struct {
  engine_slot engines[MAX_ENGINES];
  job_slot jobs[MAX_JOBS];
  uint64_t dead_engines[MAX_DEAD];
  int ndead_engines;
  uint64_t dead_jobs[MAX_DEAD];
  int ndead_jobs;
  size_t layer_bytes; /* layer memory allocated in this input */
  int used_disk;
} S;

/* Handles destroyed in earlier inputs (never reused: still invalid now). */
static uint64_t g_old_dead_engine, g_old_dead_job;

static int is_live_engine(uint64_t h) {
  for (int i = 0; i < MAX_ENGINES; i++)
    if (S.engines[i].live && (uint64_t)(uintptr_t)S.engines[i].h == h) return 1;
  return 0;
}
static int is_live_job(uint64_t h) {
  for (int i = 0; i < MAX_JOBS; i++)
    if (S.jobs[i].live && (uint64_t)(uintptr_t)S.jobs[i].h == h) return 1;
  return 0;
}

/* A job whose engine was destroyed may fail with the engine's LMC_E_INVALID_HANDLE ("the status the
 * job itself failed with", lmc_job_wait): its own handle is still live then. */
static int job_engine_gone(uint64_t h) {
  for (int i = 0; i < MAX_JOBS; i++)
    if (S.jobs[i].live && (uint64_t)(uintptr_t)S.jobs[i].h == h) return !is_live_engine(S.jobs[i].engine);
  return 0;
}
static int job_failed_for_its_engine(lmc_status st, uint64_t h) {
  const char *msg = lmc_last_error_message();
  return st == LMC_E_INVALID_HANDLE && job_engine_gone(h) && msg && strstr(msg, "engine") != NULL;
}

static void new_handle(uint64_t h, const char *kind) {
  if (h == 0) die("returned LMC_OK with a NULL %s handle", kind);
  if (!seen_insert(h))
    die("returned %s handle 0x%" PRIx64 ", a number already handed out before (to an engine or a job, live or destroyed)",
        kind, h);
}

static void remember_dead(uint64_t *arr, int *n, uint64_t h) {
  if (*n < MAX_DEAD) arr[(*n)++] = h;
  else arr[h % MAX_DEAD] = h;
}

/* A handle for an engine or job parameter: live ones of the expected kind most often, then the other
 * kind, destroyed ones, NULL and made-up numbers. */
static uint64_t pick_handle(reader *r, int want_engine) {
  uint8_t sel = u8(r);
  int i;
  switch (sel % 16) {
  case 0: case 1: case 2: case 3: case 4: case 5: case 6: case 7: case 8: /* a live one of the right kind */
    if (want_engine) {
      for (int k = 0; k < MAX_ENGINES; k++) {
        i = (sel / 16 + k) % MAX_ENGINES;
        if (S.engines[i].live) return (uint64_t)(uintptr_t)S.engines[i].h;
      }
    } else {
      for (int k = 0; k < MAX_JOBS; k++) {
        i = (sel / 16 + k) % MAX_JOBS;
        if (S.jobs[i].live) return (uint64_t)(uintptr_t)S.jobs[i].h;
      }
    }
    return 0;
  case 9: /* a live one of the other kind */
    if (!want_engine) {
      for (i = 0; i < MAX_ENGINES; i++)
        if (S.engines[i].live) return (uint64_t)(uintptr_t)S.engines[i].h;
    } else {
      for (i = 0; i < MAX_JOBS; i++)
        if (S.jobs[i].live) return (uint64_t)(uintptr_t)S.jobs[i].h;
    }
    return 0;
  case 10: /* a destroyed engine */
    if (S.ndead_engines) return S.dead_engines[u8(r) % S.ndead_engines];
    return g_old_dead_engine;
  case 11: /* a destroyed job */
    if (S.ndead_jobs) return S.dead_jobs[u8(r) % S.ndead_jobs];
    return g_old_dead_job;
  case 12: return 0;
  case 13: { /* a live handle plus or minus a little */
    uint64_t base = 0;
    for (i = 0; i < MAX_ENGINES && !base; i++)
      if (S.engines[i].live) base = (uint64_t)(uintptr_t)S.engines[i].h;
    for (i = 0; i < MAX_JOBS && !base; i++)
      if (S.jobs[i].live) base = (uint64_t)(uintptr_t)S.jobs[i].h;
    return base + (uint64_t)(int64_t)(int8_t)u8(r);
  }
  case 14: { /* kind bits swapped / made-up numbers in the handle's shape */
    static const uint64_t shaped[] = {1, 16, 0x10000, 0x10010, (1ull << 48) | 0x10000, (2ull << 48) | 0x10000,
                                      (3ull << 48) | 0x10000, 1ull << 48, 2ull << 48, UINT64_MAX, 0x8000000000000000ull};
    return shaped[u8(r) % (sizeof shaped / sizeof shaped[0])];
  }
  default: return u64(r);
  }
}

/* I4 after a call that took handle h as an engine (want_engine) or a job. */
static void check_handle_status(lmc_status st, uint64_t h, int want_engine) {
  int live = want_engine ? is_live_engine(h) : is_live_job(h);
  if (!want_engine && live && job_failed_for_its_engine(st, h)) return;
  if (live && st == LMC_E_INVALID_HANDLE) die("live %s handle 0x%" PRIx64 " refused: %s", want_engine ? "engine" : "job", h,
                                               lmc_last_error_message());
  if (!live && st != LMC_E_INVALID_HANDLE)
    die("%s handle 0x%" PRIx64 " is not a live %s (%s%s) but the call returned %s, not LMC_E_INVALID_HANDLE",
        want_engine ? "engine" : "job", h, want_engine ? "engine" : "job",
        is_live_engine(h) ? "it is a live engine" : is_live_job(h) ? "it is a live job" : "destroyed, NULL or made up",
        "", sname(st));
}

/* Every live engine and job still answers (after destroying something of the wrong kind). */
static void check_all_alive(const char *after) {
  char saved[sizeof g_call];
  memcpy(saved, g_call, sizeof saved);
  for (int i = 0; i < MAX_ENGINES; i++) {
    if (!S.engines[i].live) continue;
    lmc_stats st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    set_call("lmc_engine_get_stats(0x%" PRIx64 ") after %s", (uint64_t)(uintptr_t)S.engines[i].h, saved);
    lmc_status s = lmc_engine_get_stats(S.engines[i].h, &st);
    check_status(s);
    if (s != LMC_OK) die("a live engine stopped answering after %s: %s", after, sname(s));
  }
  for (int i = 0; i < MAX_JOBS; i++) {
    if (!S.jobs[i].live) continue;
    lmc_transfer_result res;
    memset(&res, 0, sizeof res);
    res.struct_size = sizeof res;
    set_call("lmc_job_wait(&result, 0x%" PRIx64 ", 0) after %s", (uint64_t)(uintptr_t)S.jobs[i].h, saved);
    lmc_status s = lmc_job_wait(&res, S.jobs[i].h, 0);
    check_status(s);
    if (s == LMC_E_INVALID_HANDLE && !job_failed_for_its_engine(s, (uint64_t)(uintptr_t)S.jobs[i].h))
      die("a live job stopped answering after %s", after);
    int32_t fin = 0x5A5A5A5A;
    set_call("lmc_job_poll(&finished, 0x%" PRIx64 ") after %s", (uint64_t)(uintptr_t)S.jobs[i].h, saved);
    s = lmc_job_poll(&fin, S.jobs[i].h);
    check_status(s);
    if (s != LMC_OK) die("a live job stopped answering lmc_job_poll after %s: %s", after, sname(s));
  }
  memcpy(g_call, saved, sizeof saved);
}

static void add_job(lmc_job *h, uint64_t engine, int op, int64_t n, int64_t first, int64_t bpt) {
  new_handle((uint64_t)(uintptr_t)h, "job");
  for (int i = 0; i < MAX_JOBS; i++)
    if (!S.jobs[i].live) {
      memset(&S.jobs[i], 0, sizeof S.jobs[i]);
      S.jobs[i].h = h;
      S.jobs[i].live = 1;
      S.jobs[i].engine = engine;
      S.jobs[i].op = op;
      S.jobs[i].n = n;
      S.jobs[i].first = first;
      S.jobs[i].bpt = bpt;
      return;
    }
  /* no room: release it at once */
  lmc_job_destroy(h);
  remember_dead(S.dead_jobs, &S.ndead_jobs, (uint64_t)(uintptr_t)h);
}

/* ---------------------------------------------------------------------------------------------- */
/* Temp directory, sockets, disk tier                                                              */
/* ---------------------------------------------------------------------------------------------- */

static char g_dir[256];      /* private temp dir of this process */
static char g_disk[300];     /* <dir>/disk */
static char g_file[300];     /* <dir>/afile: a regular file, must never be deleted */
static uint8_t *g_big;       /* BIG_REGION of read-only zero pages, or NULL */

static int rm_cb(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
  (void)sb; (void)flag; (void)ftw;
  remove(path);
  return 0;
}

static void make_afile(void) {
  int fd = open(g_file, O_CREAT | O_WRONLY, 0600);
  if (fd >= 0) {
    if (write(fd, "keep me\n", 8) < 0) { /* nothing to do */ }
    close(fd);
  }
}

static void cleanup_dir_at_exit(void) {
  if (g_dir[0]) nftw(g_dir, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc; (void)argv;
  /* The CUDA driver is looked up once per process: make it missing, so CUDA layers answer
   * LMC_E_NO_DEVICE everywhere (the harness's layer memory is host memory anyway). */
  setenv("LMC_CUDA_LIBRARY", "/nonexistent/libcuda.so.1", 1);
  const char *trace = getenv("LMC_FUZZ_TRACE");
  g_trace = trace && *trace && strcmp(trace, "0") != 0;
  const char *tmp = getenv("LMC_FUZZ_TMPDIR");
  snprintf(g_dir, sizeof g_dir, "%s/lmcfuzz.XXXXXX", tmp && *tmp ? tmp : "/tmp");
  if (!mkdtemp(g_dir)) {
    perror("mkdtemp");
    exit(1);
  }
  snprintf(g_disk, sizeof g_disk, "%s/disk", g_dir);
  snprintf(g_file, sizeof g_file, "%s/afile", g_dir);
  make_afile();
  atexit(cleanup_dir_at_exit);
  void *big = mmap(NULL, BIG_REGION + 65536, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  g_big = big == MAP_FAILED ? NULL : big;
  return 0;
}

/* A socket path: mostly one of 4 names in the private dir; else empty, too long, in a missing
 * directory, the regular file, or fuzzed bytes (no '/', so it stays in the private dir). NULL is
 * returned as NULL. */
static const char *pick_socket(reader *r, char *buf, size_t cap) {
  uint8_t sel = u8(r);
  switch (sel % 12) {
  case 0: case 1: case 2: case 3: case 4: case 5: snprintf(buf, cap, "%s/s%d", g_dir, sel % 4); return buf;
  case 6: return NULL;
  case 7: buf[0] = 0; return buf;
  case 8: { /* around the 107-byte limit */
    int len = 100 + u8(r) % 20;
    int n = snprintf(buf, cap, "%s/", g_dir);
    while (n < len && (size_t)n + 1 < cap) buf[n++] = 'x';
    buf[n] = 0;
    return buf;
  }
  case 9: snprintf(buf, cap, "%s/missing/dir/s", g_dir); return buf;
  case 10: snprintf(buf, cap, "%s", g_file); return buf;
  default: {
    int n = snprintf(buf, cap, "%s/", g_dir);
    int len = u8(r) % 40;
    for (int i = 0; i < len && (size_t)n + 1 < cap; i++) {
      uint8_t c = u8(r);
      if (c == '/' || c == 0) c = '_';
      buf[n++] = (char)c;
    }
    buf[n] = 0;
    return buf;
  }
  }
}

/* ---------------------------------------------------------------------------------------------- */
/* Config JSON                                                                                     */
/* ---------------------------------------------------------------------------------------------- */

typedef struct {
  char *p;
  size_t n, cap;
} sbuf;

static void sb_putn(sbuf *b, const char *s, size_t n) {
  if (b->n + n + 1 > b->cap) {
    size_t ncap = (b->cap ? b->cap * 2 : 1024);
    while (ncap < b->n + n + 1) ncap *= 2;
    b->p = realloc(b->p, ncap);
    if (!b->p) die("out of memory");
    b->cap = ncap;
  }
  memcpy(b->p + b->n, s, n);
  b->n += n;
  b->p[b->n] = 0;
}
static void sb_put(sbuf *b, const char *s) { sb_putn(b, s, strlen(s)); }
static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...) {
  char tmp[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  if (n > 0) sb_putn(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

static const char *const k_keys[] = {
    "chunk_size", "local_cpu", "max_local_cpu_size", "save_unfull_chunk", "save_decode_cache",
    "pre_caching_hash_algorithm", "cache_policy", "min_retrieve_tokens", "enable_async_loading",
    "lookup_timeout_ms", "blocking_timeout_secs", "max_local_disk_size", "remote_serde", "priority_limit",
    "extra_config", "local_disk", "remote_url", "gds_path", "use_layerwise", "enable_blending", "enable_pd",
    "enable_p2p", "enable_controller", "local_cpu_use_hugepages", "enable_lazy_memory_allocator",
    "use_gpu_connector_v3", "enable_kv_events", "kv_events_queue_size",
};
#define N_KEYS (sizeof k_keys / sizeof k_keys[0])

/* JSON value texts every key gets tried with. */
static const char *const k_extreme_values[] = {
    "0", "-0", "1", "-1", "0.5", "1.5", "16", "256", "1e300", "-1e300", "1e400", "-1e400", "1e-400",
    "5e-324", "1.7976931348623157e308", "9223372036854775807", "9223372036854775808",
    "-9223372036854775809", "2147483647", "2147483648", "-2147483649", "4294967296", "1048576", "1048577",
    "1073741824", "1073741825", "3600000", "3600000.0000001", "3600", "3600.5", "0.0000001",
    "123456789012345678901234567890", "1E+2", "NaN", "Infinity", "-Infinity", "0x10", "01", "+1", ".5",
    "true", "false", "null", "\"\"", "\"LRU\"", "\"lru\"", "\"LFU\"", "\"S3FIFO\"", "\"sha256\"",
    "\"xxh3_128\"", "\"builtin\"", "\"md5\"", "\"naive\"", "\"cachegen\"", "\"\\ud800\"", "\"\\udc00\\ud800\"",
    "\"a\\ud800b\"", "\"\\u0000\"", "\"\xff\xfe\"", "\"\xed\xa0\x80\"", "\"\xc0\xaf\"", "\"\\\"\"", "[]", "{}",
    "[1,2]", "{\"a\":1}", "{\"remote_ttl_secs\":1e300}", "{\"remote_ttl_secs\":-1}",
    "{\"remote_ttl_secs\":\"\\ud800\"}", "{\"\\ud800\":1}", "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    "\"redis://127.0.0.1:1/0\"", "\"redis://127.0.0.1:1/99999999999\"", "\"redis://127.0.0.1:99999\"",
    "\"redis://\\ud800:1\"", "\"http://x\"", "\"redis://[::1]:1\"",
};
#define N_EXTREME (sizeof k_extreme_values / sizeof k_extreme_values[0])

static void json_fuzz_string(sbuf *b, reader *r) {
  /* a JSON string of fuzzed bytes: quotes and backslashes escaped, control bytes escaped, other
   * bytes (invalid UTF-8 included) raw, plus lone-surrogate escapes */
  sb_put(b, "\"");
  int len = u8(r) % 24;
  for (int i = 0; i < len; i++) {
    uint8_t c = u8(r);
    if (c == '"' || c == '\\') sb_put(b, "\\\\");
    else if (c < 0x20) sb_put(b, c % 2 ? "\\ud800" : "\\udfff");
    else if (c == '/') sb_put(b, "_");
    else sb_putn(b, (const char *)&c, 1);
  }
  sb_put(b, "\"");
}

static void json_nested(sbuf *b, int depth, int arrays) {
  for (int i = 0; i < depth; i++) sb_put(b, arrays ? "[" : "{\"a\":");
  sb_put(b, "1");
  for (int i = 0; i < depth; i++) sb_put(b, arrays ? "]" : "}");
}

/* A value meant to be accepted, for the key (so engines get made). */
static void json_good_value(sbuf *b, reader *r, const char *key) {
  uint8_t v = u8(r);
  if (!strcmp(key, "chunk_size")) { static const int cs[] = {1, 2, 3, 4, 8, 16, 32, 64, 256}; sb_printf(b, "%d", cs[v % 9]); }
  else if (!strcmp(key, "max_local_cpu_size")) { static const char *m[] = {"0", "0.0001", "0.001", "0.01", "0.002", "1e-6"}; sb_put(b, m[v % 6]); }
  else if (!strcmp(key, "pre_caching_hash_algorithm")) sb_put(b, v % 2 ? "\"xxh3_128\"" : "\"sha256\"");
  else if (!strcmp(key, "cache_policy")) sb_put(b, "\"LRU\"");
  else if (!strcmp(key, "min_retrieve_tokens")) sb_printf(b, "%d", v % 64);
  else if (!strcmp(key, "lookup_timeout_ms")) sb_put(b, "100");
  else if (!strcmp(key, "blocking_timeout_secs")) sb_put(b, v % 2 ? "0.05" : "0.2");
  else if (!strcmp(key, "max_local_disk_size")) sb_put(b, v % 2 ? "0.01" : "0");
  else if (!strcmp(key, "remote_serde")) sb_put(b, "\"naive\"");
  else if (!strcmp(key, "priority_limit")) sb_printf(b, "%d", (int)(int8_t)v);
  else if (!strcmp(key, "extra_config")) {
    switch (v % 5) {
    case 0: sb_put(b, "{}"); break;
    case 1: sb_put(b, "null"); break;
    case 2: sb_put(b, "{\"remote_ttl_secs\":"); sb_put(b, k_extreme_values[u8(r) % N_EXTREME]); sb_put(b, "}"); break;
    case 3: sb_put(b, "{"); json_fuzz_string(b, r); sb_put(b, ":"); json_fuzz_string(b, r); sb_put(b, "}"); break;
    default: sb_put(b, "{\"x\":"); json_nested(b, u8(r) % 80, u8(r) % 2); sb_put(b, "}"); break;
    }
  } else if (!strcmp(key, "local_disk")) {
    switch (v % 5) {
    case 0: sb_printf(b, "\"%s\"", g_disk); break;
    case 1: sb_printf(b, "\"file://%s\"", g_disk); break;
    case 2: sb_printf(b, "\"%s/\\ud800\"", g_disk); break;
    case 3: sb_printf(b, "\"%s\"", g_file); break; /* a file, not a directory */
    default: sb_printf(b, "\"%s/", g_disk); { sbuf t = {0}; json_fuzz_string(&t, r); sb_put(b, t.p + 1); free(t.p); } break;
    }
    S.used_disk = 1;
  } else if (!strcmp(key, "remote_url")) {
    static const char *u[] = {"\"redis://127.0.0.1:1/0\"", "null", "\"rediss://127.0.0.1:1\"", "\"redis://127.0.0.1:1/x\"",
                              "\"valkey://127.0.0.1:1/3\"", "\"redis://:pw@127.0.0.1:1/0\""};
    sb_put(b, u[v % 6]);
  } else if (!strcmp(key, "gds_path")) sb_put(b, "null");
  else if (!strcmp(key, "enable_kv_events")) sb_put(b, v % 4 ? "true" : "false"); /* mostly on */
  else if (!strcmp(key, "kv_events_queue_size")) { static const int q[] = {1, 2, 3, 16, 65536}; sb_printf(b, "%d", q[v % 5]); }
  else sb_put(b, v % 4 == 0 ? "true" : "false"); /* the boolean keys */
}

static void json_any_value(sbuf *b, reader *r, const char *key) {
  uint8_t sel = u8(r);
  if (sel < 128) json_good_value(b, r, key);
  else if (sel < 200) sb_put(b, k_extreme_values[u8(r) % N_EXTREME]);
  else if (sel < 220) json_fuzz_string(b, r);
  else if (sel < 230) json_nested(b, 1 + u16(r) % 3000, u8(r) % 2);
  else if (sel < 245) sb_printf(b, "%" PRId64, any64(r));
  else { /* a few raw bytes: usually invalid JSON; no '/', no ASCII \u escapes */
    int len = u8(r) % 8;
    for (int i = 0; i < len; i++) {
      uint8_t c = u8(r);
      if (c == '/' || c == '\\' || c == 0) c = '_';
      sb_putn(b, (const char *)&c, 1);
    }
  }
}

/* Replaces what could make the library touch files outside the private directory (absolute paths,
 * URLs) in raw fuzzed config text: '/' and ASCII \u escapes (\u002f is '/'). */
static void sanitize_raw(char *s, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (s[i] == '/') s[i] = '_';
    if (s[i] == '\\' && i + 1 < n && s[i + 1] == 'u') {
      if (i + 5 < n && s[i + 2] == '0' && s[i + 3] == '0' && (s[i + 4] == '0' || s[i + 4] == '1' || s[i + 4] == '2' ||
          s[i + 4] == '3' || s[i + 4] == '4' || s[i + 4] == '5' || s[i + 4] == '6' || s[i + 4] == '7'))
        s[i + 1] = 'x';
    }
  }
}

/* Builds a config into b; returns NULL for a NULL config. */
static const char *make_config(reader *r, sbuf *b) {
  b->n = 0;
  sb_put(b, "");
  uint8_t mode = u8(r);
  switch (mode % 16) {
  case 0: return NULL;
  case 1: return b->p; /* "" */
  case 2: { /* raw fuzzed text */
    int len = u8(r);
    for (int i = 0; i < len; i++) {
      char c = (char)u8(r);
      if (c == 0) c = ' ';
      sb_putn(b, &c, 1);
    }
    sanitize_raw(b->p, b->n);
    return b->p;
  }
  case 3: json_nested(b, 1 + u16(r) % 5000, u8(r) % 2); return b->p;
  case 4: /* not an object */
    sb_put(b, k_extreme_values[u8(r) % N_EXTREME]);
    return b->p;
  default: { /* an object */
    int nkeys = u8(r) % 7;
    sb_put(b, mode % 16 == 5 ? " {\n" : "{");
    for (int i = 0; i < nkeys; i++) {
      if (i) sb_put(b, ",");
      uint8_t ks = u8(r);
      const char *key = k_keys[ks % N_KEYS];
      if (ks >= 240) json_fuzz_string(b, r); /* a made-up key */
      else if (ks >= 236) sb_put(b, "\"remote_ttl_secs\"");
      else if (ks >= 232) sb_put(b, "\"chunk_\\u0073ize\""); /* an escaped spelling */
      else sb_printf(b, "\"%s\"", key);
      sb_put(b, ":");
      json_any_value(b, r, key);
    }
    uint8_t tail = u8(r);
    if (tail >= 250) sb_put(b, ",}"); /* trailing comma */
    else if (tail >= 245) sb_put(b, "} /* comment */");
    else if (tail >= 240) sb_put(b, "}}");
    else if (tail >= 236) { /* truncated */ }
    else sb_put(b, "}");
    return b->p;
  }
  }
}

static const char *make_model(reader *r, char *buf, size_t cap) {
  uint8_t sel = u8(r);
  switch (sel % 8) {
  case 0: return NULL;
  case 1: return "";
  case 2: return "\xed\xa0\x80"; /* a lone surrogate in CESU-8: invalid UTF-8 */
  case 3: return "\xff\xfe model";
  case 4: {
    size_t n = cap - 1 < 5000 ? cap - 1 : 5000;
    memset(buf, 'm', n);
    buf[n] = 0;
    return buf;
  }
  case 5: {
    size_t len = u8(r) % 32, i;
    for (i = 0; i < len && i + 1 < cap; i++) {
      buf[i] = (char)u8(r);
      if (!buf[i]) buf[i] = '?';
    }
    buf[i] = 0;
    return buf;
  }
  default: return "fuzz-model";
  }
}

/* ---------------------------------------------------------------------------------------------- */
/* Buffers for tokens, slots, extra keys                                                            */
/* ---------------------------------------------------------------------------------------------- */

static int32_t g_tokens[MAX_TOKENS + 16];
static int64_t g_slots[MAX_TOKENS + 16];
static uint8_t g_extra[EXTRA_KEY_MAX];
static uint64_t g_fresh_counter; /* makes round-trip tokens unique in this process */

/* Fills n tokens. */
static void fill_tokens(reader *r, int32_t *t, int64_t n) {
  uint8_t mode = u8(r);
  uint64_t s = u64(r);
  for (int64_t i = 0; i < n; i++) {
    switch (mode % 5) {
    case 0: t[i] = (int32_t)i; break;
    case 1: t[i] = (int32_t)(mode); break;
    case 2: t[i] = (int32_t)(rng_next(&s) % 32000); break;
    case 3: t[i] = (int32_t)rng_next(&s); break;
    default: t[i] = k_interesting32[rng_next(&s) % N_INTERESTING32]; break;
    }
  }
}

static int64_t engine_total_slots(const engine_slot *e) {
  if (!e || e->nlayers == 0) return 64;
  return (int64_t)e->layers[0].num_blocks * e->layers[0].block_size;
}

static void fill_slots(reader *r, int64_t *sl, int64_t n, int64_t total) {
  uint8_t mode = u8(r);
  uint64_t s = u64(r);
  if (total <= 0) total = 1;
  for (int64_t i = 0; i < n; i++) {
    switch (mode % 8) {
    case 0: case 1: sl[i] = i % total; break;
    case 2: sl[i] = (int64_t)(rng_next(&s) % (uint64_t)total); break;
    case 3: sl[i] = rng_next(&s) % 4 ? (int64_t)(rng_next(&s) % (uint64_t)total) : -1; break;
    case 4: sl[i] = i == n / 2 ? any64(r) : i % total; break;
    case 5: sl[i] = i == n - 1 ? total : i % total; break;
    case 6: sl[i] = (int64_t)rng_next(&s); break;
    default: sl[i] = -1; break;
    }
  }
}

/* A (pointer, length) pair for an array of real_n elements: with the real pointer the length is at
 * most real_n (or negative); with NULL anything. */
static int64_t pick_len(reader *r, int has_ptr, int64_t real_n) {
  uint8_t sel = u8(r);
  if (!has_ptr) return sel < 64 ? 0 : any64(r);
  if (sel < 160) return real_n;
  if (sel < 200) return real_n ? (int64_t)(u16(r) % (uint64_t)(real_n + 1)) : 0;
  if (sel < 220) return 0;
  int64_t v = any64(r);
  return v < 0 ? v : (v <= real_n ? v : -v); /* never more than the buffer holds */
}

typedef struct {
  const uint8_t *p;
  int64_t len;
} extra_key;

static extra_key pick_extra(reader *r) {
  extra_key k = {NULL, 0};
  uint8_t sel = u8(r);
  if (sel < 96) return k; /* none */
  if (sel < 112) { k.len = any64(r); return k; } /* NULL with a length */
  if (sel < 120 && g_big) { /* lengths near .NET's Array.MaxLength, over real (zero) memory */
    static const int64_t big[] = {0x7FFFFFC7, 0x7FFFFFC8, 0x7FFFFFFF, 0x80000000, 0x7FFFFFC6};
    k.p = g_big;
    k.len = big[u8(r) % 5];
    return k;
  }
  size_t len = sel < 200 ? u8(r) % 33 : u16(r) % EXTRA_KEY_MAX;
  for (size_t i = 0; i < len; i++) g_extra[i] = u8(r);
  k.p = g_extra;
  k.len = pick_len(r, 1, (int64_t)len);
  return k;
}

/* ---------------------------------------------------------------------------------------------- */
/* Layer memory and descriptions                                                                   */
/* ---------------------------------------------------------------------------------------------- */

static layer_buf *alloc_layer_buf(engine_slot *e, size_t region) {
  if (e->nbufs >= (int)(sizeof e->bufs / sizeof e->bufs[0])) return NULL;
  if (S.layer_bytes + region > LAYER_MEMORY_BUDGET) return NULL;
  layer_buf *b = &e->bufs[e->nbufs];
  b->mem = malloc(region + 2 * GUARD);
  if (!b->mem) return NULL;
  b->region = region;
  memset(b->mem, GUARD_BYTE, GUARD);
  memset(b->mem + GUARD + region, GUARD_BYTE, GUARD);
  fill_random(b->mem + GUARD, region, region * 31 + 7);
  S.layer_bytes += region;
  e->nbufs++;
  return b;
}

static void check_guards(const engine_slot *e, const char *when) {
  for (int i = 0; i < e->nbufs; i++) {
    const layer_buf *b = &e->bufs[i];
    for (size_t k = 0; k < GUARD; k++)
      if (b->mem[k] != GUARD_BYTE || b->mem[GUARD + b->region + k] != GUARD_BYTE)
        die("%s: the library wrote outside a layer buffer (guard byte %zu %s the region of %zu bytes changed)", when,
            k, b->mem[k] != GUARD_BYTE ? "before" : "after", b->region);
  }
}

/* Element extent (in elements) of a layout: 1 + max offset, or -1 on overflow. */
static __int128 layout_extent(const lmc_kv_layer_desc *d) {
  __int128 last = d->head_size;
  if (d->kv_count > 1) last += (__int128)(d->kv_count - 1) * d->kv_stride;
  if (d->num_blocks > 1) last += (__int128)(d->num_blocks - 1) * d->block_stride;
  if (d->block_size > 1) last += (__int128)(d->block_size - 1) * d->token_stride;
  if (d->num_kv_heads > 1) last += (__int128)(d->num_kv_heads - 1) * d->head_stride;
  return last;
}

/* Builds a registration into desc[] (stride bytes apart, struct_size = stride unless mutated) over a
 * fresh buffer of engine e. Returns the number of layers described, or -1 when no memory was left. */
static int make_layers(reader *r, engine_slot *e, uint8_t *descs, size_t stride, uint32_t struct_size,
                       layer_buf **out_buf) {
  static const int elem_sizes[] = {1, 2, 4};
  int elem = elem_sizes[u8(r) % 3];
  int kv = u8(r) % 4 == 0 ? 1 : 2;
  int nb = 1 + u8(r) % 24, bs = 1 + u8(r) % 16, nh = 1 + u8(r) % 4, hs = 1 + u8(r) % 16;
  int nl = 1 + u8(r) % MAX_LAYERS;
  uint8_t layout = u8(r);
  int64_t D = hs, N = nh, B = bs;
  int64_t kvs, bls, tks, hds, per_layer; /* strides and elements per layer */
  switch (layout % 5) {
  case 0: /* FlashAttention NHD [2, B, N, H, D] */
    hds = D; tks = N * D; bls = B * N * D; kvs = nb * bls; per_layer = kv * kvs; break;
  case 1: /* HND: physical [2, B, H, N, D] */
    tks = D; hds = B * D; bls = N * B * D; kvs = nb * bls; per_layer = kv * kvs; break;
  case 2: /* blocks-first [B, 2, N, H, D] */
    hds = D; tks = N * D; kvs = B * N * D; bls = kv * kvs; per_layer = nb * bls; break;
  case 3: /* packed [B, H, N, 2D]: K = [..., :D], V = [..., D:] */
    kvs = D; tks = 2 * D; hds = B * 2 * D; bls = N * B * 2 * D; per_layer = nb * bls; kv = 2; break;
  default: /* MLA [B, N, C] */
    kv = 1; nh = 1; N = 1; hds = D; tks = D; bls = B * D; kvs = 0; per_layer = nb * bls; break;
  }
  uint8_t placement = u8(r);
  size_t layer_bytes = (size_t)per_layer * (size_t)elem;
  size_t slack = u8(r) % 64;
  size_t region;
  switch (placement % 4) {
  case 1: region = layer_bytes + slack; break;                 /* all layers share one tensor */
  case 2: region = layer_bytes * (size_t)nl + slack; break;    /* cross-layer interleaved */
  default: region = layer_bytes * (size_t)nl + slack * (size_t)nl; break; /* consecutive */
  }
  if (region == 0) region = 64;
  layer_buf *buf = alloc_layer_buf(e, region);
  if (!buf) return -1;
  *out_buf = buf;
  uint8_t *base = buf->mem + GUARD;
  for (int l = 0; l < nl; l++) {
    lmc_kv_layer_desc d;
    memset(&d, 0, sizeof d);
    d.struct_size = struct_size;
    d.device_kind = LMC_DEVICE_HOST;
    d.elem_size = elem;
    d.kv_count = kv;
    d.num_blocks = nb;
    d.block_size = bs;
    d.num_kv_heads = nh;
    d.head_size = hs;
    d.kv_stride = kvs;
    d.block_stride = bls;
    d.token_stride = tks;
    d.head_stride = hds;
    size_t off;
    switch (placement % 4) {
    case 1: off = 0; break;
    case 2: /* [B, L, ...]: each layer's block stride grows by the layer count */
      d.block_stride = bls * nl;
      if (layout % 5 == 0 || layout % 5 == 1) d.kv_stride = (int64_t)nb * bls * nl;
      off = (size_t)l * (size_t)bls * (size_t)elem;
      break;
    default: off = (size_t)l * (layer_bytes + slack); break;
    }
    if (off > region) off = region;
    d.base_address = (uint64_t)(uintptr_t)(base + off);
    d.span_bytes = region - off;
    /* mutations: one field of one layer gets a fuzzed value */
    uint8_t m = u8(r);
    if (m >= 160) {
      int64_t v = any64(r);
      switch (m % 18) {
      case 0: d.elem_size = (int32_t)v; break;
      case 1: d.kv_count = (int32_t)v; break;
      case 2: d.num_blocks = (int32_t)v; break;
      case 3: d.block_size = (int32_t)v; break;
      case 4: d.num_kv_heads = (int32_t)v; break;
      case 5: d.head_size = (int32_t)v; break;
      case 6: d.kv_stride = v; break;
      case 7: d.block_stride = v; break;
      case 8: d.token_stride = v; break;
      case 9: d.head_stride = v; break;
      case 10: d.reserved = (int32_t)v; break;
      case 11: d.device_kind = (int32_t)v; break;
      case 12: d.device_index = (int32_t)v; break;
      case 13: d.base_address += 1; if (d.span_bytes) d.span_bytes -= 1; break; /* misaligned */
      case 14: d.span_bytes = v >= 0 && (uint64_t)v < d.span_bytes ? (uint64_t)v : d.span_bytes / 2; break;
      case 15: d.base_address = 0; d.span_bytes = (uint64_t)v & 0xFFFF; break; /* NULL base */
      case 16: d.device_kind = LMC_DEVICE_CUDA; break;
      default: d.struct_size = (uint32_t)v; break; /* the library reads at most 4104 bytes of each */
      }
    }
    memcpy(descs + (size_t)l * stride, &d, sizeof d);
  }
  return nl;
}

/* ---------------------------------------------------------------------------------------------- */
/* Engines                                                                                         */
/* ---------------------------------------------------------------------------------------------- */

static engine_slot *slot_of(uint64_t h) {
  for (int i = 0; i < MAX_ENGINES; i++)
    if (S.engines[i].live && (uint64_t)(uintptr_t)S.engines[i].h == h) return &S.engines[i];
  return NULL;
}

static void free_engine_memory(engine_slot *e) {
  check_guards(e, "engine teardown");
  for (int i = 0; i < e->nbufs; i++) {
    free(e->bufs[i].mem);
    S.layer_bytes -= e->bufs[i].region;
  }
  memset(e, 0, sizeof *e);
}

static void destroy_engine_handle(uint64_t h) {
  int live = is_live_engine(h), live_job = is_live_job(h);
  char what[128];
  snprintf(what, sizeof what, "lmc_engine_destroy(0x%" PRIx64 ")%s", h, live ? "" : live_job ? " [a live job]" : " [not a live engine]");
  set_call("%s", what);
  lmc_engine_destroy((lmc_engine *)(uintptr_t)h);
  if (live) {
    engine_slot *e = slot_of(h);
    e->live = 0;
    remember_dead(S.dead_engines, &S.ndead_engines, h);
    g_old_dead_engine = h;
    free_engine_memory(e);
    /* the handle is dead now */
    lmc_stats st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    set_call("lmc_engine_get_stats(0x%" PRIx64 ") on the engine just destroyed", h);
    lmc_status s = lmc_engine_get_stats((lmc_engine *)(uintptr_t)h, &st);
    check_status(s);
    if (s != LMC_E_INVALID_HANDLE) die("a destroyed engine answered %s", sname(s));
  }
  set_call("%s", what);
  check_all_alive(what);
}

static void destroy_job_handle(uint64_t h) {
  int live = is_live_job(h), live_engine = is_live_engine(h);
  char what[128];
  snprintf(what, sizeof what, "lmc_job_destroy(0x%" PRIx64 ")%s", h, live ? "" : live_engine ? " [a live engine]" : " [not a live job]");
  set_call("%s", what);
  lmc_job_destroy((lmc_job *)(uintptr_t)h);
  if (live) {
    for (int i = 0; i < MAX_JOBS; i++)
      if (S.jobs[i].live && (uint64_t)(uintptr_t)S.jobs[i].h == h) S.jobs[i].live = 0;
    remember_dead(S.dead_jobs, &S.ndead_jobs, h);
    g_old_dead_job = h;
    lmc_transfer_result res;
    memset(&res, 0, sizeof res);
    res.struct_size = sizeof res;
    set_call("lmc_job_wait(&result, 0x%" PRIx64 ", 0) on the job just destroyed", h);
    lmc_status s = lmc_job_wait(&res, (lmc_job *)(uintptr_t)h, 0);
    check_status(s);
    if (s != LMC_E_INVALID_HANDLE) die("a destroyed job answered %s", sname(s));
    int32_t fin = 0x5A5A5A5A;
    set_call("lmc_job_poll(&finished, 0x%" PRIx64 ") on the job just destroyed", h);
    s = lmc_job_poll(&fin, (lmc_job *)(uintptr_t)h);
    check_status(s);
    if (s != LMC_E_INVALID_HANDLE || fin != 0x5A5A5A5A) die("a destroyed job answered lmc_job_poll with %s", sname(s));
  }
  set_call("%s", what);
  check_all_alive(what);
}

static sbuf g_config;
static char g_model[8192];

static void op_create(reader *r) {
  const char *config = make_config(r, &g_config);
  const char *model = make_model(r, g_model, sizeof g_model);
  int32_t world = 1, worker = 0;
  uint8_t ws = u8(r);
  if (ws >= 192) {
    world = any32(r);
    worker = any32(r);
  } else if (ws >= 128) {
    world = 1 + ws % 8;
    worker = (ws / 8) % 9;
  }
  int null_out = u8(r) == 255;
  lmc_engine *eng = (lmc_engine *)(uintptr_t)0x5A5A5A5A5A5A5A5Aull;
  set_call("lmc_engine_create(%s, config=%.600s%s, model=%s%.40s%s, world_size=%d, worker_id=%d)",
           null_out ? "NULL" : "&engine", config ? config : "NULL",
           config && strlen(config) > 600 ? "…" : "", model ? "\"" : "", model ? model : "NULL", model ? "\"" : "",
           world, worker);
  lmc_status st = lmc_engine_create(null_out ? NULL : &eng, config, model, world, worker);
  check_status(st);
  if (null_out) {
    if (st == LMC_OK) die("LMC_OK with engine_out NULL");
    return;
  }
  if (st != LMC_OK) {
    if ((uintptr_t)eng != (uintptr_t)0x5A5A5A5A5A5A5A5Aull) die("engine_out written on failure");
    return;
  }
  new_handle((uint64_t)(uintptr_t)eng, "engine");
  for (int i = 0; i < MAX_ENGINES; i++)
    if (!S.engines[i].live) {
      memset(&S.engines[i], 0, sizeof S.engines[i]);
      S.engines[i].h = eng;
      S.engines[i].live = 1;
      return;
    }
  /* all slots taken: destroy it again */
  set_call("lmc_engine_destroy(0x%" PRIx64 ") [no room]", (uint64_t)(uintptr_t)eng);
  lmc_engine_destroy(eng);
  remember_dead(S.dead_engines, &S.ndead_engines, (uint64_t)(uintptr_t)eng);
}

static uint8_t g_descs[MAX_LAYERS * DESC_STRIDE_MAX + DESC_STRIDE_MAX] __attribute__((aligned(16)));

static void op_register(reader *r) {
  uint64_t h = pick_handle(r, 1);
  engine_slot *e = slot_of(h);
  engine_slot scratch;
  memset(&scratch, 0, sizeof scratch);
  engine_slot *owner = e ? e : &scratch; /* memory for a call on a dead handle is freed at once */
  static const uint32_t strides[] = {88, 88, 88, 88, 96, 128, 4096, 4104, 80, 87, 89, 0, 8};
  uint8_t ss = u8(r);
  size_t stride = strides[ss % (sizeof strides / sizeof strides[0])];
  size_t array_stride = stride >= sizeof(lmc_kv_layer_desc) && stride <= DESC_STRIDE_MAX ? stride : sizeof(lmc_kv_layer_desc);
  memset(g_descs, 0, sizeof g_descs);
  layer_buf *buf = NULL;
  int nl = make_layers(r, owner, g_descs, array_stride, (uint32_t)stride, &buf);
  if (nl < 0) {
    if (owner == &scratch) free_engine_memory(&scratch);
    return;
  }
  int32_t count = nl;
  const void *ptr = g_descs;
  uint8_t cs = u8(r);
  if (cs >= 240) ptr = NULL, count = any32(r);
  else if (cs >= 224) count = u8(r) % 2 ? 0 : (any32(r) | INT32_MIN); /* zero or negative */
  else if (cs >= 200) count = 1 + (int32_t)(u8(r) % (uint32_t)nl); /* fewer */
  /* The library steps through the array by layer 0's struct_size (it refuses more than 4096): g_descs
   * holds MAX_LAYERS of the largest. A struct_size larger than that is a lie about the memory: only
   * ever with one layer, of which the library reads the fields it knows. */
  uint32_t ss0 = ((const lmc_kv_layer_desc *)g_descs)->struct_size;
  if (ptr && ss0 > DESC_STRIDE_MAX && count > 1) count = 1;
  set_call("lmc_engine_register_layers(0x%" PRIx64 ", %s, %d) [elem=%d kv=%d blocks=%d bs=%d heads=%d hs=%d "
           "strides kv=%" PRId64 " block=%" PRId64 " token=%" PRId64 " head=%" PRId64 " span=%" PRIu64 " struct_size=%u]",
           h, ptr ? "layers" : "NULL", count, ((lmc_kv_layer_desc *)g_descs)->elem_size,
           ((lmc_kv_layer_desc *)g_descs)->kv_count, ((lmc_kv_layer_desc *)g_descs)->num_blocks,
           ((lmc_kv_layer_desc *)g_descs)->block_size, ((lmc_kv_layer_desc *)g_descs)->num_kv_heads,
           ((lmc_kv_layer_desc *)g_descs)->head_size, ((lmc_kv_layer_desc *)g_descs)->kv_stride,
           ((lmc_kv_layer_desc *)g_descs)->block_stride, ((lmc_kv_layer_desc *)g_descs)->token_stride,
           ((lmc_kv_layer_desc *)g_descs)->head_stride, ((lmc_kv_layer_desc *)g_descs)->span_bytes, ss0);
  lmc_status st = lmc_engine_register_layers((lmc_engine *)(uintptr_t)h, ptr, count);
  check_status(st);
  check_handle_status(st, h, 1);
  if (owner == &scratch) {
    free_engine_memory(&scratch);
    return;
  }
  if (st == LMC_OK) {
    /* what the library accepted: verify its promise that every element lies within the span */
    for (int l = 0; l < count; l++) {
      lmc_kv_layer_desc d;
      memcpy(&d, g_descs + (size_t)l * array_stride, sizeof d);
      __int128 ext = layout_extent(&d) * d.elem_size;
      uint8_t *lo = buf->mem + GUARD, *hi = lo + buf->region;
      if (d.device_kind != LMC_DEVICE_HOST) die("accepted a non-host layer on a machine without a CUDA driver");
      if ((uint8_t *)(uintptr_t)d.base_address < lo || (__int128)d.span_bytes < ext ||
          (__int128)(d.base_address - (uint64_t)(uintptr_t)lo) + ext > (__int128)buf->region || hi < lo)
        die("accepted layer %d whose elements reach beyond span_bytes or the memory given", l);
      e->layers[l] = d;
    }
    e->nlayers = count;
    e->cur = buf;
  }
}

/* ---------------------------------------------------------------------------------------------- */
/* Requests: lookup / store / retrieve / prefetch, synchronous or as jobs                          */
/* ---------------------------------------------------------------------------------------------- */

typedef struct {
  const int32_t *tokens;
  const int64_t *slots;
  int64_t n;      /* num_tokens passed */
  int64_t real_n; /* elements in the arrays */
} token_args;

static token_args pick_tokens(reader *r, engine_slot *e, int want_slots) {
  token_args a;
  uint8_t sel = u8(r);
  int64_t real_n;
  if (sel < 40) real_n = u8(r) % 8;
  else if (sel < 200) real_n = u16(r) % 300;
  else real_n = u16(r) % (MAX_TOKENS + 1);
  fill_tokens(r, g_tokens, real_n);
  if (want_slots) fill_slots(r, g_slots, real_n, engine_total_slots(e));
  uint8_t np = u8(r);
  a.tokens = np == 255 ? NULL : g_tokens;
  a.slots = want_slots && np == 254 ? NULL : g_slots;
  a.real_n = real_n;
  a.n = pick_len(r, a.tokens != NULL || (want_slots && a.slots != NULL), real_n);
  return a;
}

#define SENT 0x5A5A5A5A5A5A5A5ALL

static void check_count(lmc_status st, int64_t out, int64_t n, const char *what) {
  if (st != LMC_OK) {
    if (out != SENT) die("%s written on failure (%s): %" PRId64, what, sname(st), out);
    return;
  }
  if (out < 0 || out > (n > 0 ? n : 0)) die("%s = %" PRId64 " is outside [0, num_tokens=%" PRId64 "]", what, out, n);
}

enum { OP_LOOKUP, OP_STORE, OP_RETRIEVE, OP_PREFETCH };
static const char *const k_op_names[] = {"lmc_lookup", "lmc_store", "lmc_retrieve", "lmc_prefetch_start"};

#define ARRAY_MAX_LENGTH 0x7FFFFFC7LL /* .NET's Array.MaxLength: the library's bound on any length */
#define EXTRA_KEY_LIMIT (1LL << 20)   /* the header's 1 MiB bound on an extra key */
#define REQ_BUF 4096                  /* bytes behind a request pointer (its struct_size is at most this) */

static int32_t g_blocks[MAX_TOKENS + 16];
static int64_t g_eq[MAX_TOKENS + 16]; /* a block table expanded by the harness */
static uint8_t g_reqbuf[REQ_BUF] __attribute__((aligned(16)));

/* Block ids: nblk = blocks of table_block_size tokens in the cache. */
static void fill_blocks(reader *r, int32_t *ids, int64_t count, int64_t nblk) {
  uint8_t mode = u8(r);
  uint64_t s = u64(r);
  if (nblk <= 0) nblk = 1;
  if (nblk > INT32_MAX) nblk = INT32_MAX;
  switch (mode % 9) {
  case 0: case 1: /* distinct blocks in a random order (repeating when more ids than blocks) */
    for (int64_t i = 0; i < count; i++) ids[i] = (int32_t)(i % nblk);
    for (int64_t i = 0; i + 1 < count && i < nblk; i++) {
      int64_t lim = count < nblk ? count : nblk, j = i + (int64_t)(rng_next(&s) % (uint64_t)(lim - i));
      int32_t t = ids[i];
      ids[i] = ids[j];
      ids[j] = t;
    }
    break;
  case 2: for (int64_t i = 0; i < count; i++) ids[i] = rng_next(&s) % 4 ? (int32_t)(rng_next(&s) % (uint64_t)nblk) : -1; break;
  case 3: for (int64_t i = 0; i < count; i++) ids[i] = (int32_t)(i % nblk); break;
  case 4: for (int64_t i = 0; i < count; i++) ids[i] = i == count / 2 ? any32(r) : (int32_t)(i % nblk); break;
  case 5: for (int64_t i = 0; i < count; i++) ids[i] = i == count - 1 ? (int32_t)nblk : (int32_t)(i % nblk); break;
  case 6: for (int64_t i = 0; i < count; i++) ids[i] = (int32_t)rng_next(&s); break;
  case 7: for (int64_t i = 0; i < count; i++) ids[i] = -1 - (int32_t)(rng_next(&s) % 3); break; /* -1, -2, -3 */
  default: for (int64_t i = 0; i < count; i++) ids[i] = -1; break;
  }
}

static int32_t engine_block_size(const engine_slot *e) { return e && e->nlayers ? e->layers[0].block_size : 16; }

/* table_block_size: mostly the layers' block size, else small ones, 0, negative, huge. */
static int32_t pick_table_block_size(reader *r, const engine_slot *e) {
  uint8_t sel = u8(r);
  if (sel < 160) return engine_block_size(e);
  if (sel < 200) return 1 + u8(r) % 64;
  if (sel < 215) return 1;
  return any32(r);
}

/* Blocks needed to cover n tokens. */
static int64_t blocks_needed(int64_t n, int32_t tbs) {
  if (n <= 0 || tbs < 1) return 0;
  return (n + tbs - 1) / tbs;
}

/* A request for op, in g_reqbuf (or NULL). Every array it points to is the harness's own; lengths
 * beyond them only ever go with NULL pointers. */
static lmc_request *pick_request(reader *r, const engine_slot *e, int op) {
  uint8_t sel = u8(r);
  int64_t real_n;
  if (sel < 40) real_n = u8(r) % 8;
  else if (sel < 200) real_n = u16(r) % 300;
  else real_n = u16(r) % (MAX_TOKENS + 1);
  fill_tokens(r, g_tokens, real_n);
  lmc_request q;
  memset(&q, 0, sizeof q);
  q.struct_size = sizeof q;
  uint8_t dk = u8(r);
  q.destination_kind = dk < 112 ? LMC_DESTINATION_SLOTS : dk < 224 ? LMC_DESTINATION_BLOCK_TABLE : any32(r);
  int64_t total = engine_total_slots(e);
  fill_slots(r, g_slots, real_n, total);
  q.table_block_size = pick_table_block_size(r, e);
  int32_t tbs_for_fill = q.table_block_size >= 1 ? q.table_block_size : 1;
  int64_t need = blocks_needed(real_n, tbs_for_fill);
  int64_t real_b = need + 8 <= MAX_TOKENS + 16 ? need + 8 : MAX_TOKENS + 16;
  fill_blocks(r, g_blocks, real_b, total / tbs_for_fill);
  uint8_t np = u8(r);
  q.tokens = np == 255 ? NULL : g_tokens;
  q.slot_mapping = np == 254 ? NULL : g_slots;
  q.block_ids = np == 253 ? NULL : g_blocks;
  q.num_tokens = pick_len(r, q.tokens != NULL || q.slot_mapping != NULL, real_n);
  uint8_t nb = u8(r);
  if (!q.block_ids) q.num_block_ids = nb < 64 ? 0 : any64(r);
  else if (nb < 150) q.num_block_ids = need < real_b ? need : real_b;
  else if (nb < 180) q.num_block_ids = (int64_t)(u16(r) % (uint64_t)(need + 1)); /* fewer: tokens past the last block */
  else if (nb < 210) q.num_block_ids = real_b;                                /* more than needed */
  else if (nb < 220) q.num_block_ids = 0;
  else q.num_block_ids = pick_len(r, 1, real_b);
  uint8_t ft = u8(r);
  if (op == OP_LOOKUP || op == OP_PREFETCH) q.first_token = ft < 224 ? 0 : any64(r);
  else if (ft < 200) q.first_token = (int64_t)(u8(r) % 64);
  else if (ft < 215) q.first_token = q.num_tokens + (ft % 2); /* num_tokens (allowed), num_tokens + 1 */
  else q.first_token = any64(r);
  extra_key k = pick_extra(r);
  q.extra_key = k.p;
  q.extra_key_len = k.len;
  uint8_t rs = u8(r);
  if (rs >= 240) q.reserved = any32(r);
  uint8_t st = u8(r);
  if (st >= 250) q.stream = (void *)(uintptr_t)u64(r); /* host layers ignore the stream */
  else if (st >= 240) q.stream = (void *)(uintptr_t)0xDEADBEEF;
  uint8_t ss = u8(r);
  static const uint32_t sizes[] = {0, 4, 8, 80, 87, 89, 96, 128, 256, REQ_BUF};
  if (ss >= 200) q.struct_size = sizes[ss % (sizeof sizes / sizeof sizes[0])];
  /* bytes past sizeof(lmc_request), up to struct_size: zeros or garbage (fields of a newer header) */
  memset(g_reqbuf, 0, sizeof g_reqbuf);
  if (u8(r) >= 192) fill_random(g_reqbuf, sizeof g_reqbuf, q.num_tokens ^ 0x77);
  memcpy(g_reqbuf, &q, sizeof q);
  return u8(r) == 255 ? NULL : (lmc_request *)g_reqbuf;
}

static const char *dest_name(int32_t k) {
  return k == LMC_DESTINATION_SLOTS ? "slots" : k == LMC_DESTINATION_BLOCK_TABLE ? "block_table" : "invalid";
}

/* A request for the messages: "{n=…, kind=…, …}". */
static const char *describe_request(const lmc_request *q, char *buf, size_t cap) {
  if (!q) return "NULL";
  snprintf(buf, cap,
           "{struct_size=%u, destination_kind=%d (%s), tokens=%s, num_tokens=%" PRId64 ", extra_key=%s, extra_key_len=%" PRId64
           ", first_token=%" PRId64 ", slot_mapping=%s, block_ids=%s, num_block_ids=%" PRId64 ", table_block_size=%d, reserved=%d, stream=%p}",
           q->struct_size, q->destination_kind, dest_name(q->destination_kind), q->tokens ? "tokens" : "NULL", q->num_tokens,
           q->extra_key ? (q->extra_key == g_big ? "zero-pages" : "key") : "NULL", q->extra_key_len, q->first_token,
           q->slot_mapping ? "slots" : "NULL", q->block_ids ? "ids" : "NULL", q->num_block_ids, q->table_block_size, q->reserved,
           q->stream);
  return buf;
}

/* The checks every request gets: struct_size, reserved, tokens, extra key, first_token in range. */
static int request_common_ok(const lmc_request *q) {
  if (!q || q->struct_size < sizeof(lmc_request) || q->reserved != 0) return 0;
  if (q->extra_key_len < 0 || q->extra_key_len > EXTRA_KEY_LIMIT || (q->extra_key_len > 0 && !q->extra_key)) return 0;
  if (q->num_tokens < 0 || q->num_tokens > ARRAY_MAX_LENGTH || (q->num_tokens > 0 && !q->tokens)) return 0;
  return q->first_token >= 0 && q->first_token <= q->num_tokens;
}

/* The destination as one slot per token (into out), as the header defines it; 0 when the header
 * says the call fails (a negative id other than -1 anywhere in the table, a slot outside the cache
 * of `total` slots, a NULL array with a length, a bad table_block_size or kind). */
static int request_slots(const lmc_request *q, int64_t total, int64_t *out) {
  int64_t n = q->num_tokens;
  if (q->destination_kind == LMC_DESTINATION_SLOTS) {
    if (n > 0 && !q->slot_mapping) return 0;
    for (int64_t t = 0; t < n; t++) out[t] = q->slot_mapping[t];
  } else if (q->destination_kind == LMC_DESTINATION_BLOCK_TABLE) {
    if (q->num_block_ids < 0 || q->num_block_ids > ARRAY_MAX_LENGTH || (q->num_block_ids > 0 && !q->block_ids)) return 0;
    if (q->table_block_size < 1) return 0;
    for (int64_t b = 0; b < q->num_block_ids; b++)
      if (q->block_ids[b] < -1) return 0;
    for (int64_t t = 0; t < n; t++) {
      int64_t b = t / q->table_block_size;
      int32_t id = b < q->num_block_ids ? q->block_ids[b] : -1;
      if (id < -1) return 0;
      out[t] = id == -1 ? -1 : (int64_t)id * q->table_block_size + t % q->table_block_size;
    }
  } else {
    return 0;
  }
  for (int64_t t = 0; t < n; t++)
    if (out[t] < -1 || out[t] >= total) return 0;
  return 1;
}

/* Whether the header promises LMC_OK for op with this request on engine e (live, handle checked
 * elsewhere). */
static int request_valid(const lmc_request *q, const engine_slot *e, int op) {
  if (!e || e->nlayers == 0 || !request_common_ok(q)) return 0;
  if (op == OP_LOOKUP || op == OP_PREFETCH) return q->first_token == 0;
  return request_slots(q, engine_total_slots(e), g_eq);
}

/* Result structs: a buffer with canaries, struct_size fuzzed. */
static uint8_t g_resbuf[STRUCT_BUF + 64] __attribute__((aligned(16)));
static uint8_t g_resbefore[sizeof g_resbuf];

static uint32_t pick_result_size(reader *r, uint32_t real) {
  static const uint32_t v[] = {0, 4, 7, 8, 16, 40, 48, 56, 72, 79, 80, 81, 88, 128, 4096};
  uint8_t sel = u8(r);
  if (sel < 176) return real;
  if (sel < 248) return v[sel % (sizeof v / sizeof v[0])];
  return u16(r) % (STRUCT_BUF + 1);
}

/* Prepares g_resbuf with struct_size ss; returns it, or NULL (when the next byte says so). */
static void *prep_result(reader *r, uint32_t real, uint32_t *ss_out) {
  uint32_t ss = pick_result_size(r, real);
  int null_ptr = u8(r) == 255;
  memset(g_resbuf, CANARY, sizeof g_resbuf);
  memcpy(g_resbuf, &ss, 4);
  memcpy(g_resbefore, g_resbuf, sizeof g_resbuf);
  *ss_out = ss;
  return null_ptr ? NULL : g_resbuf;
}

/* I6/I7 on a result struct: nothing written when may_write is 0; else nothing at or past struct_size
 * and struct_size itself unchanged. */
static void check_result_buf(uint32_t ss, int may_write, const char *what) {
  if (!may_write) {
    if (memcmp(g_resbuf, g_resbefore, sizeof g_resbuf) != 0) {
      size_t i = 0;
      while (g_resbuf[i] == g_resbefore[i]) i++;
      die("%s: wrote byte %zu of the result struct (struct_size %u) although the call may not write it", what, i, ss);
    }
    return;
  }
  for (size_t i = ss < 4 ? 4 : ss; i < sizeof g_resbuf; i++)
    if (g_resbuf[i] != g_resbefore[i]) die("%s: wrote byte %zu of a result struct with struct_size %u", what, i, ss);
  if (memcmp(g_resbuf, g_resbefore, 4) != 0) die("%s: changed the result's struct_size", what);
}

#define FIELD_IN(ss, type, field) ((size_t)(ss) >= offsetof(type, field) + sizeof(((type *)0)->field))

/* Sanity of a transfer result's fields that lie within struct_size. bpt: KV bytes per token of the
 * registration the request ran on (0: unknown). */
static void check_transfer_fields(const lmc_transfer_result *res, uint32_t ss, int op, int64_t n, int64_t first, int64_t bpt,
                                  const char *what) {
  int64_t matched = FIELD_IN(ss, lmc_transfer_result, tokens_matched) ? res->tokens_matched : 0;
  if (matched < 0 || matched > n) die("%s: tokens_matched %" PRId64 " outside [0, num_tokens=%" PRId64 "]", what, matched, n);
  if (FIELD_IN(ss, lmc_transfer_result, tokens_copied)) {
    int64_t lim = op == OP_STORE ? matched : op == OP_RETRIEVE ? (matched > first ? matched - first : 0) : 0;
    if (!FIELD_IN(ss, lmc_transfer_result, tokens_matched)) lim = n;
    if (res->tokens_copied < 0 || res->tokens_copied > lim)
      die("%s: tokens_copied %" PRId64 " outside [0, %" PRId64 "] (tokens_matched %" PRId64 ", first_token %" PRId64 ")", what,
          res->tokens_copied, lim, matched, first);
    if (FIELD_IN(ss, lmc_transfer_result, bytes_copied) && bpt > 0 && res->bytes_copied != res->tokens_copied * bpt)
      die("%s: bytes_copied %" PRId64 " is not tokens_copied %" PRId64 " x %" PRId64 " bytes per token", what, res->bytes_copied,
          res->tokens_copied, bpt);
  }
  if (FIELD_IN(ss, lmc_transfer_result, bytes_copied) && res->bytes_copied < 0) die("%s: bytes_copied < 0", what);
  if (FIELD_IN(ss, lmc_transfer_result, chunks_skipped_for_space) && res->chunks_skipped_for_space < 0)
    die("%s: chunks_skipped_for_space < 0", what);
  for (int t = 0; t < LMC_MAX_TIERS; t++)
    if ((size_t)ss >= offsetof(lmc_transfer_result, chunks_by_tier) + 8 * (size_t)(t + 1) && res->chunks_by_tier[t] < 0)
      die("%s: chunks_by_tier[%d] = %" PRId64 " < 0", what, t, res->chunks_by_tier[t]);
  if (FIELD_IN(ss, lmc_transfer_result, elapsed_ns) && res->elapsed_ns < 0) die("%s: elapsed_ns < 0", what);
}

/* KV bytes per token of an engine's registration. */
static int64_t engine_bpt(const engine_slot *e) {
  if (!e) return 0;
  int64_t b = 0;
  for (int l = 0; l < e->nlayers; l++)
    b += (int64_t)e->layers[l].kv_count * e->layers[l].num_kv_heads * e->layers[l].head_size * e->layers[l].elem_size;
  return b;
}

/* I4 with a result struct checked before the handle: NULL or struct_size < 8 may be refused as an
 * argument first (any handle), but a live handle is never refused. */
static void check_handle_or_result(lmc_status st, uint64_t h, int want_engine, int result_bad) {
  if (!result_bad) {
    check_handle_status(st, h, want_engine);
    return;
  }
  int live = want_engine ? is_live_engine(h) : is_live_job(h);
  if (live && st != LMC_E_INVALID_ARGUMENT && !(!want_engine && job_failed_for_its_engine(st, h)))
    die("result_out NULL or struct_size < 8 with a live %s: %s, expected LMC_E_INVALID_ARGUMENT", want_engine ? "engine" : "job",
        sname(st));
  if (!live && st != LMC_E_INVALID_ARGUMENT && st != LMC_E_INVALID_HANDLE)
    die("result_out NULL or struct_size < 8 with a %s that is not live: %s", want_engine ? "engine" : "job", sname(st));
}

/* Statuses pinned for a request on a live handle with a usable out-parameter: LMC_OK for a request
 * the header accepts, LMC_E_INVALID_ARGUMENT for one it refuses. */
static void check_request_status(lmc_status st, int valid) {
  if (valid && st != LMC_OK) die("a request the header accepts failed: %s %s", sname(st), lmc_last_error_message());
  if (!valid && st != LMC_E_INVALID_ARGUMENT) die("a request the header refuses returned %s, not LMC_E_INVALID_ARGUMENT", sname(st));
}

static void op_lookup(reader *r) {
  uint64_t h = pick_handle(r, 1);
  engine_slot *e = slot_of(h);
  lmc_request *q = pick_request(r, e, OP_LOOKUP);
  uint32_t ss;
  lmc_lookup_result *res = prep_result(r, sizeof(lmc_lookup_result), &ss);
  char d[700];
  set_call("lmc_lookup(%s struct_size=%u, 0x%" PRIx64 ", %s)", res ? "&result" : "NULL", ss, h, describe_request(q, d, sizeof d));
  lmc_status st = lmc_lookup(res, (lmc_engine *)(uintptr_t)h, q);
  check_status(st);
  int result_bad = !res || ss < 8;
  check_handle_or_result(st, h, 1, result_bad);
  if (e && !result_bad) check_request_status(st, request_valid(q, e, OP_LOOKUP));
  check_result_buf(ss, st == LMC_OK, g_call);
  if (st == LMC_OK) {
    int64_t n = q->num_tokens, sum = 0;
    if (FIELD_IN(ss, lmc_lookup_result, hit_tokens) && (res->hit_tokens < 0 || res->hit_tokens > n))
      die("hit_tokens %" PRId64 " outside [0, num_tokens=%" PRId64 "]", res->hit_tokens, n);
    if (ss >= sizeof(lmc_lookup_result)) {
      for (int t = 0; t < LMC_MAX_TIERS; t++) {
        if (res->tokens_by_tier[t] < 0) die("tokens_by_tier[%d] < 0", t);
        sum += res->tokens_by_tier[t];
      }
      if (sum != res->hit_tokens) die("tokens_by_tier add up to %" PRId64 ", not hit_tokens %" PRId64, sum, res->hit_tokens);
      if (res->elapsed_ns < 0) die("elapsed_ns < 0");
    }
  }
}

static void add_job(lmc_job *h, uint64_t engine, int op, int64_t n, int64_t first, int64_t bpt);

/* A store or retrieve: synchronous (job_out NULL) or as a job (as_job). */
static void op_transfer(reader *r, int op, int as_job) {
  uint64_t h = pick_handle(r, 1);
  engine_slot *e = slot_of(h);
  lmc_request *q = pick_request(r, e, op);
  uint32_t ss;
  lmc_transfer_result *res = prep_result(r, sizeof(lmc_transfer_result), &ss);
  lmc_job *job = (lmc_job *)(uintptr_t)SENT;
  int valid = request_valid(q, e, op);
  int64_t n = q ? q->num_tokens : 0, first = q ? q->first_token : 0, bpt = engine_bpt(e);
  char d[700];
  set_call("%s(%s struct_size=%u, 0x%" PRIx64 ", %s, %s)", k_op_names[op], res ? "&result" : "NULL", ss, h,
           describe_request(q, d, sizeof d), as_job ? "&job" : "NULL");
  lmc_status st = op == OP_STORE ? lmc_store(res, (lmc_engine *)(uintptr_t)h, q, as_job ? &job : NULL)
                                 : lmc_retrieve(res, (lmc_engine *)(uintptr_t)h, q, as_job ? &job : NULL);
  check_status(st);
  int result_bad = !as_job && (!res || ss < 8);
  check_handle_or_result(st, h, 1, result_bad);
  if (e && !result_bad) check_request_status(st, valid);
  /* with a job, result_out is not written (it may be NULL); synchronously only on success */
  check_result_buf(ss, !as_job && st == LMC_OK, g_call);
  if (as_job) {
    if (st == LMC_OK) {
      add_job(job, h, op, n, first, bpt);
      if (e) e->pending_jobs++;
    } else if ((uintptr_t)job != (uintptr_t)SENT) die("job_out written on failure");
  } else if (st == LMC_OK) {
    check_transfer_fields(res, ss, op, n, first, bpt, g_call);
  }
  if (e) check_guards(e, g_call);
}

/* Waits for every job the engine runs, also those whose handles were destroyed: registering the
 * very layers again waits for jobs in flight (and keeps the cache: the namespace is the same). */
static void barrier(engine_slot *e) {
  if (!e->pending_jobs) return;
  static lmc_kv_layer_desc d[MAX_LAYERS];
  memcpy(d, e->layers, sizeof(lmc_kv_layer_desc) * (size_t)e->nlayers);
  for (int l = 0; l < e->nlayers; l++) d[l].struct_size = sizeof(lmc_kv_layer_desc);
  set_call("barrier: lmc_engine_register_layers(0x%" PRIx64 ", the layers it has, %d) to wait for its jobs",
           (uint64_t)(uintptr_t)e->h, e->nlayers);
  lmc_status st = lmc_engine_register_layers(e->h, d, e->nlayers);
  check_status(st);
  if (st != LMC_OK) die("registering the layers the engine already accepted failed: %s", lmc_last_error_message());
  e->pending_jobs = 0;
  check_guards(e, g_call);
}

/* Walks the bytes of tokens [from, to) of every registered layer at their slots; calls fn(offset,
 * length) with offsets into the registration's region. */
static void for_each_token_bytes(const engine_slot *e, const int64_t *slots, int64_t from, int64_t to,
                                 void (*fn)(size_t off, size_t len, void *ctx), void *ctx) {
  const uint8_t *lo = e->cur->mem + GUARD;
  for (int l = 0; l < e->nlayers; l++) {
    const lmc_kv_layer_desc *d = &e->layers[l];
    size_t run = (size_t)d->head_size * (size_t)d->elem_size;
    for (int64_t t = from; t < to; t++) {
      int64_t s = slots[t];
      if (s < 0) continue;
      int64_t block = s / d->block_size, off = s % d->block_size;
      for (int kv = 0; kv < d->kv_count; kv++)
        for (int hd = 0; hd < d->num_kv_heads; hd++) {
          __int128 el = (__int128)(kv ? kv * (__int128)d->kv_stride : 0) + (__int128)block * d->block_stride +
                        (__int128)off * d->token_stride + (__int128)hd * d->head_stride;
          __int128 byte = (__int128)(d->base_address - (uint64_t)(uintptr_t)lo) + el * d->elem_size;
          if (byte < 0 || byte + (__int128)run > (__int128)e->cur->region) die("harness: element outside the region");
          fn((size_t)byte, run, ctx);
        }
    }
  }
}

typedef struct {
  uint8_t *dst;
  const uint8_t *src;
} copy_ctx;
static void copy_run(size_t off, size_t len, void *ctx) {
  copy_ctx *c = ctx;
  memcpy(c->dst + off, c->src + off, len);
}

static uint8_t *g_snap, *g_expect, *g_other;
static size_t g_snap_cap;

static void ensure_snap(size_t region) {
  if (g_snap_cap >= region) return;
  free(g_snap);
  free(g_expect);
  free(g_other);
  g_snap = malloc(region);
  g_expect = malloc(region);
  g_other = malloc(region);
  if (!g_snap || !g_expect || !g_other) die("out of memory");
  g_snap_cap = region;
}

/* Runs a store or retrieve of a request the header accepts, synchronously or as a job that is waited
 * for at once, and returns its status and result (the job's for a job). */
static lmc_status run_transfer(engine_slot *e, int op, const lmc_request *q, int as_job, lmc_transfer_result *out) {
  memset(out, 0, sizeof *out);
  out->struct_size = sizeof *out;
  if (!as_job) {
    lmc_status st = op == OP_STORE ? lmc_store(out, e->h, q, NULL) : lmc_retrieve(out, e->h, q, NULL);
    check_status(st);
    return st;
  }
  lmc_job *job = NULL;
  lmc_status st = op == OP_STORE ? lmc_store(NULL, e->h, q, &job) : lmc_retrieve(NULL, e->h, q, &job);
  check_status(st);
  if (st != LMC_OK) return st;
  new_handle((uint64_t)(uintptr_t)job, "job");
  st = lmc_job_wait(out, job, -1);
  check_status(st);
  if (st == LMC_E_TIMEOUT) die("lmc_job_wait(-1) returned LMC_E_TIMEOUT");
  lmc_transfer_result again;
  memset(&again, 0, sizeof again);
  again.struct_size = sizeof again;
  lmc_status st2 = lmc_job_result(&again, job);
  check_status(st2);
  if (st2 != st || (st == LMC_OK && memcmp(&again, out, sizeof again) != 0))
    die("lmc_job_result after lmc_job_wait gave %s and another result than the wait's %s", sname(st2), sname(st));
  lmc_job_destroy(job);
  remember_dead(S.dead_jobs, &S.ndead_jobs, (uint64_t)(uintptr_t)job);
  return st;
}

/* A fresh extra key (a request never seen in this process: a request with another extra key never
 * hits): the fuzzed prefix in g_extra[0, len) then a counter. Returns the length. */
static int64_t fresh_key(uint8_t *key, int64_t len) {
  g_fresh_counter++;
  uint64_t unique[2] = {g_fresh_counter, ((uint64_t)getpid() << 32) | 0x4C4D4346u /* "LMCF" */};
  memcpy(key + len, unique, sizeof unique);
  return len + (int64_t)sizeof unique;
}

/* I5: store fresh tokens, scramble the layers, retrieve them into the same destination, compare.
 * The destination is a slot mapping or a block table of distinct blocks (table_block_size = the
 * layers' block size, or 1: any slots); each call is synchronous or a job. */
static void op_roundtrip(reader *r) {
  uint64_t h = pick_handle(r, 1);
  engine_slot *e = slot_of(h);
  if (!e || e->nlayers == 0 || !e->cur) return;
  barrier(e);
  int64_t total = engine_total_slots(e);
  int64_t n = 1 + u16(r) % 600;
  if (n > total) n = total;
  if (n > MAX_TOKENS) n = MAX_TOKENS;
  uint8_t mode = u8(r); /* bit 0: block table; bit 1: table_block_size 1; bit 2: store as a job; bit 3: retrieve as a job */
  fill_tokens(r, g_tokens, n);
  /* distinct slots: a shuffled prefix of [0, total), or of whole blocks for a block table */
  uint64_t s = u64(r) | 1;
  int bt = mode & 1;
  int32_t tbs = bt && !(mode & 2) ? e->layers[0].block_size : 1;
  int64_t units = total / tbs, need = (n + tbs - 1) / tbs;
  static int64_t perm[1 << 20];
  if (units > (int64_t)(sizeof perm / sizeof perm[0])) return;
  if (need > units) { n = units * tbs; need = units; }
  if (n == 0) return;
  for (int64_t i = 0; i < units; i++) perm[i] = i;
  for (int64_t i = 0; i < need; i++) {
    int64_t j = i + (int64_t)(rng_next(&s) % (uint64_t)(units - i));
    int64_t t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
    g_blocks[i] = (int32_t)perm[i];
  }
  for (int64_t t = 0; t < n; t++) g_slots[t] = bt ? (int64_t)g_blocks[t / tbs] * tbs + t % tbs : perm[t];
  int64_t klen = 0;
  uint8_t ek = u8(r);
  if (ek >= 128) {
    klen = ek % 33;
    for (int64_t i = 0; i < klen; i++) g_extra[i] = u8(r);
  }
  klen = fresh_key(g_extra, klen);
  lmc_request q;
  memset(&q, 0, sizeof q);
  q.struct_size = sizeof q;
  q.destination_kind = bt ? LMC_DESTINATION_BLOCK_TABLE : LMC_DESTINATION_SLOTS;
  q.tokens = g_tokens;
  q.num_tokens = n;
  q.extra_key = g_extra;
  q.extra_key_len = klen;
  q.slot_mapping = bt ? NULL : g_slots;
  q.block_ids = bt ? g_blocks : NULL;
  q.num_block_ids = bt ? need : 0;
  q.table_block_size = bt ? tbs : 0;
  size_t region = e->cur->region;
  uint8_t *mem = e->cur->mem + GUARD;
  ensure_snap(region);
  fill_random(mem, region, s ^ 0xA5A5A5A5ull);
  memcpy(g_snap, mem, region);
  lmc_transfer_result sr, rr;
  char d[700];
  set_call("round trip: lmc_store(&result, 0x%" PRIx64 ", fresh tokens, distinct slots %s, %s)", h,
           describe_request(&q, d, sizeof d), mode & 4 ? "&job" : "NULL");
  lmc_status st = run_transfer(e, OP_STORE, &q, mode & 4, &sr);
  check_guards(e, g_call);
  if (st != LMC_OK) die("a store the header accepts failed: %s %s", sname(st), lmc_last_error_message());
  check_transfer_fields(&sr, sizeof sr, OP_STORE, n, 0, engine_bpt(e), g_call);
  if (memcmp(mem, g_snap, region) != 0) die("lmc_store wrote into the KV layers");
  int64_t stored = sr.tokens_matched;
  if (sr.tokens_copied != stored) die("a store of fresh tokens copied %" PRId64 " tokens but reports %" PRId64 " cached", sr.tokens_copied, stored);
  if (stored == 0) return;
  /* scramble, then retrieve into the same destination */
  fill_random(mem, region, s ^ 0x5A5A5A5A12345ull);
  memcpy(g_expect, mem, region);
  q.first_token = u8(r) < 192 ? 0 : (int64_t)(u16(r) % (uint64_t)(n + 1));
  set_call("round trip: lmc_retrieve(&result, 0x%" PRIx64 ", same request, first_token=%" PRId64 ", %s) after the store reported %" PRId64
           " tokens cached",
           h, q.first_token, mode & 8 ? "&job" : "NULL", stored);
  st = run_transfer(e, OP_RETRIEVE, &q, mode & 8, &rr);
  check_guards(e, g_call);
  if (st != LMC_OK) die("retrieve right after a successful store failed: %s %s", sname(st), lmc_last_error_message());
  check_transfer_fields(&rr, sizeof rr, OP_RETRIEVE, n, q.first_token, engine_bpt(e), g_call);
  int64_t got = rr.tokens_matched;
  if (got > stored) die("retrieved %" PRId64 " tokens but only %" PRId64 " were stored (the tokens were fresh)", got, stored);
  int64_t upto = got < stored ? got : stored;
  if (q.first_token < upto) {
    copy_ctx c = {g_expect, g_snap};
    for_each_token_bytes(e, g_slots, q.first_token, upto, copy_run, &c);
  }
  if (memcmp(mem, g_expect, region) != 0) {
    size_t i = 0;
    while (mem[i] == g_expect[i]) i++;
    die("layer memory after retrieve differs from the stored KV at byte %zu of %zu: got 0x%02x, expected 0x%02x "
        "(stored %" PRId64 ", retrieved %" PRId64 ", first_token %" PRId64 ", %d layers, %s)",
        i, region, mem[i], g_expect[i], stored, got, q.first_token, e->nlayers, dest_name(q.destination_kind));
  }
}

static int64_t lower_tier_count(engine_slot *e) {
  int32_t c = 0;
  lmc_status st = lmc_engine_tier_count(&c, e->h);
  check_status(st);
  return st == LMC_OK ? c : 0;
}

/* Two results alike but for elapsed_ns (and, with lower tiers, which tier served a chunk: a chunk
 * written down in the background may be found in either). */
static int same_result(const lmc_transfer_result *a, const lmc_transfer_result *b, int tiers) {
  if (a->tokens_matched != b->tokens_matched || a->tokens_copied != b->tokens_copied || a->bytes_copied != b->bytes_copied ||
      a->chunks_skipped_for_space != b->chunks_skipped_for_space)
    return 0;
  int64_t sa = 0, sb = 0;
  for (int t = 0; t < LMC_MAX_TIERS; t++) {
    if (!tiers && a->chunks_by_tier[t] != b->chunks_by_tier[t]) return 0;
    sa += a->chunks_by_tier[t];
    sb += b->chunks_by_tier[t];
  }
  return sa == sb;
}

static const char *fmt_result(const lmc_transfer_result *a, char *buf, size_t cap) {
  snprintf(buf, cap, "{matched %" PRId64 ", copied %" PRId64 ", bytes %" PRId64 ", skipped %" PRId64 ", by tier [%" PRId64 ", %" PRId64
           ", %" PRId64 ", %" PRId64 "]}",
           a->tokens_matched, a->tokens_copied, a->bytes_copied, a->chunks_skipped_for_space, a->chunks_by_tier[0],
           a->chunks_by_tier[1], a->chunks_by_tier[2], a->chunks_by_tier[3]);
  return buf;
}

/* I9: a block-table store and retrieve, and the same with the slot mapping the harness expands the
 * table into, give the same statuses, the same results (elapsed_ns aside) and the same KV bytes.
 * Each side uses a fresh extra key (same length) and starts from the same layer memory; the lower
 * tiers are flushed before each call so that background writes do not differ between the sides. */
static void op_twin(reader *r) {
  uint64_t h = pick_handle(r, 1);
  engine_slot *e = slot_of(h);
  if (!e || e->nlayers == 0 || !e->cur) return;
  barrier(e);
  int64_t total = engine_total_slots(e);
  int64_t n = 1 + u16(r) % 600;
  if (n > MAX_TOKENS) n = MAX_TOKENS;
  uint8_t mode = u8(r); /* bit 0: the block table side as jobs; bit 1: the slots side as jobs; bit 2: slots side first */
  fill_tokens(r, g_tokens, n);
  int32_t tbs = pick_table_block_size(r, e);
  if (tbs < 1) return; /* no slot mapping is its equal (the table is refused: see op_transfer) */
  int64_t need = blocks_needed(n, tbs), real_b = need + 8 <= MAX_TOKENS + 16 ? need + 8 : MAX_TOKENS + 16;
  fill_blocks(r, g_blocks, real_b, total / tbs);
  uint8_t nb = u8(r);
  int64_t nids = nb < 176 ? (need < real_b ? need : real_b) : nb < 216 ? (int64_t)(u16(r) % (uint64_t)(need + 1)) : real_b;
  /* ids past the blocks that hold tokens never make a slot; kept -1 or in range so that the twins
   * differ only where tokens are (a negative one anywhere refuses the table: op_transfer covers that) */
  for (int64_t b = need; b < real_b; b++)
    if (g_blocks[b] < -1) g_blocks[b] = -1;
  lmc_request bt;
  memset(&bt, 0, sizeof bt);
  bt.struct_size = sizeof bt;
  bt.destination_kind = LMC_DESTINATION_BLOCK_TABLE;
  bt.tokens = g_tokens;
  bt.num_tokens = n;
  bt.block_ids = g_blocks;
  bt.num_block_ids = nids;
  bt.table_block_size = tbs;
  int expand_ok = request_slots(&bt, INT64_MAX, g_eq); /* negative ids covering tokens make it invalid */
  if (!expand_ok) {
    /* no slot mapping says the same: the header refuses the table, and the slots its ids would give */
    for (int64_t t = 0; t < n; t++) {
      int64_t b = t / tbs;
      int32_t id = b < nids ? g_blocks[b] : -1;
      g_eq[t] = id == -1 ? -1 : (int64_t)id * tbs + t % tbs;
    }
  }
  lmc_request sl = bt;
  sl.destination_kind = LMC_DESTINATION_SLOTS;
  sl.slot_mapping = g_eq;
  sl.block_ids = NULL;
  sl.num_block_ids = 0;
  sl.table_block_size = 0;
  int64_t store_first = u8(r) < 192 ? 0 : (int64_t)(u16(r) % (uint64_t)(n + 1));
  int64_t retrieve_first = u8(r) < 192 ? 0 : (int64_t)(u16(r) % (uint64_t)(n + 1));
  int64_t klen = u8(r) % 17;
  for (int64_t i = 0; i < klen; i++) g_extra[i] = u8(r);
  static uint8_t key_b[64];
  memcpy(key_b, g_extra, (size_t)klen);
  int64_t len_a = fresh_key(g_extra, klen), len_b = fresh_key(key_b, klen);
  bt.extra_key = g_extra;
  bt.extra_key_len = len_a;
  sl.extra_key = key_b;
  sl.extra_key_len = len_b;
  int tiers = lower_tier_count(e) > 0;

  size_t region = e->cur->region;
  uint8_t *mem = e->cur->mem + GUARD;
  ensure_snap(region);
  uint64_t seed = u64(r);
  lmc_status sst[2], rst[2];
  lmc_transfer_result sres[2], rres[2];
  char msgs[2][256];
  char d[700];
  int order = (mode >> 2) & 1;
  for (int k = 0; k < 2; k++) {
    int side = k ^ order; /* 0: block table, 1: slots */
    lmc_request *q = side == 0 ? &bt : &sl;
    int as_job = (mode >> side) & 1;
    fill_random(mem, region, seed ^ 0xA5A5A5A5ull);
    if (k == 0) memcpy(g_snap, mem, region);
    if (tiers) {
      set_call("twin: lmc_engine_flush(0x%" PRIx64 ", 5000)", h);
      check_status(lmc_engine_flush(e->h, 5000));
    }
    q->first_token = store_first;
    set_call("twin (%s side): lmc_store(&result, 0x%" PRIx64 ", %s, %s)", side ? "slot mapping" : "block table", h,
             describe_request(q, d, sizeof d), as_job ? "&job" : "NULL");
    sst[side] = run_transfer(e, OP_STORE, q, as_job, &sres[side]);
    snprintf(msgs[side], sizeof msgs[side], "%s", lmc_last_error_message());
    check_guards(e, g_call);
    if (memcmp(mem, g_snap, region) != 0) die("lmc_store wrote into the KV layers");
    if (sst[side] == LMC_OK) check_transfer_fields(&sres[side], sizeof sres[side], OP_STORE, n, store_first, engine_bpt(e), g_call);
    if (tiers) {
      set_call("twin: lmc_engine_flush(0x%" PRIx64 ", 5000)", h);
      check_status(lmc_engine_flush(e->h, 5000));
    }
    fill_random(mem, region, seed ^ 0x5A5A5A5A12345ull);
    q->first_token = retrieve_first;
    set_call("twin (%s side): lmc_retrieve(&result, 0x%" PRIx64 ", %s, %s)", side ? "slot mapping" : "block table", h,
             describe_request(q, d, sizeof d), as_job ? "&job" : "NULL");
    rst[side] = run_transfer(e, OP_RETRIEVE, q, as_job, &rres[side]);
    check_guards(e, g_call);
    if (rst[side] == LMC_OK) check_transfer_fields(&rres[side], sizeof rres[side], OP_RETRIEVE, n, retrieve_first, engine_bpt(e), g_call);
    memcpy(side == 0 ? g_expect : g_other, mem, region);
  }
  char ra[200], rb[200];
  set_call("twin: block table %s vs slot mapping %s", describe_request(&bt, d, sizeof d), "(its expansion)");
  if (sst[0] != sst[1])
    die("lmc_store: block table %s (%s), its slot mapping %s (%s)", sname(sst[0]), msgs[0], sname(sst[1]), msgs[1]);
  if (!expand_ok && sst[0] == LMC_OK) die("lmc_store accepted a block table with a negative id (< -1)");
  if (sst[0] == LMC_OK && !same_result(&sres[0], &sres[1], tiers))
    die("lmc_store results differ: block table %s, slot mapping %s", fmt_result(&sres[0], ra, sizeof ra),
        fmt_result(&sres[1], rb, sizeof rb));
  if (rst[0] != rst[1]) die("lmc_retrieve: block table %s, its slot mapping %s", sname(rst[0]), sname(rst[1]));
  if (rst[0] == LMC_OK && !same_result(&rres[0], &rres[1], tiers))
    die("lmc_retrieve results differ: block table %s, slot mapping %s", fmt_result(&rres[0], ra, sizeof ra),
        fmt_result(&rres[1], rb, sizeof rb));
  if (memcmp(g_expect, g_other, region) != 0) {
    size_t i = 0;
    while (g_expect[i] == g_other[i]) i++;
    die("KV after retrieve differs at byte %zu of %zu: block table 0x%02x, slot mapping 0x%02x (store %s, retrieve %s)", i, region,
        g_expect[i], g_other[i], fmt_result(&sres[0], ra, sizeof ra), fmt_result(&rres[0], rb, sizeof rb));
  }
}

static void op_prefetch(reader *r) {
  uint64_t h = pick_handle(r, 1);
  engine_slot *e = slot_of(h);
  lmc_request *q = pick_request(r, e, OP_PREFETCH);
  lmc_job *job = (lmc_job *)(uintptr_t)SENT;
  int null_out = u8(r) == 255;
  int valid = request_valid(q, e, OP_PREFETCH);
  char d[700];
  set_call("lmc_prefetch_start(%s, 0x%" PRIx64 ", %s)", null_out ? "NULL" : "&job", h, describe_request(q, d, sizeof d));
  lmc_status st = lmc_prefetch_start(null_out ? NULL : &job, (lmc_engine *)(uintptr_t)h, q);
  check_status(st);
  if (null_out) {
    if (st == LMC_OK) die("LMC_OK with job_out NULL");
    return;
  }
  check_handle_status(st, h, 1);
  if (e) check_request_status(st, valid);
  if (st == LMC_OK) {
    add_job(job, h, OP_PREFETCH, q->num_tokens, 0, 0);
    e->pending_jobs++;
  } else if ((uintptr_t)job != (uintptr_t)SENT) die("job_out written on failure");
}

static job_slot *job_of(uint64_t h) {
  for (int i = 0; i < MAX_JOBS; i++)
    if (S.jobs[i].live && (uint64_t)(uintptr_t)S.jobs[i].h == h) return &S.jobs[i];
  return NULL;
}

/* The job invariants after lmc_job_wait / lmc_job_result with a usable result struct on a live job:
 * a job of a request the header accepted finishes with LMC_OK (host layers); once finished, it
 * answers the same status and the same result every time; a finished job never times out. */
static void check_job_outcome(job_slot *j, lmc_status st, const lmc_transfer_result *res, uint32_t ss, int64_t timeout) {
  uint64_t h = (uint64_t)(uintptr_t)j->h;
  if (job_failed_for_its_engine(st, h)) return;
  if (st == LMC_E_TIMEOUT) {
    if (timeout == -1) die("lmc_job_wait(-1) returned LMC_E_TIMEOUT");
    if (j->finished) die("a job that had finished (poll said 1, or it answered before) returned LMC_E_TIMEOUT");
    return;
  }
  if (st != LMC_OK) die("a job of a request the header accepts failed: %s %s", sname(st), lmc_last_error_message());
  check_transfer_fields(res, ss, j->op, j->n, j->first, j->bpt, g_call);
  size_t cmp = ss < sizeof j->result ? ss : sizeof j->result;
  if (j->has_result && cmp > 8 && memcmp((const uint8_t *)res + 8, (const uint8_t *)&j->result + 8, cmp - 8) != 0) {
    char a[200], b[200];
    die("the job's result changed: first %s, now %s", fmt_result(&j->result, a, sizeof a), fmt_result(res, b, sizeof b));
  }
  if (!j->has_result && ss >= sizeof j->result) {
    memcpy(&j->result, res, sizeof j->result);
    j->has_result = 1;
  }
  j->finished = 1;
}

/* lmc_job_wait (timeout fuzzed) or lmc_job_result (wait with 0). */
static void op_job_wait(reader *r, int result_only) {
  uint64_t h = pick_handle(r, 0);
  int64_t t = result_only ? 0 : timeout_ms(r);
  uint32_t ss;
  lmc_transfer_result *res = prep_result(r, sizeof(lmc_transfer_result), &ss);
  /* a live job is finished quickly by the library (host layers, local tiers), so any timeout is
   * bounded by the job itself */
  if (result_only)
    set_call("lmc_job_result(%s struct_size=%u, 0x%" PRIx64 "%s)", res ? "&result" : "NULL", ss, h, is_live_engine(h) ? " [a live engine]" : "");
  else
    set_call("lmc_job_wait(%s struct_size=%u, 0x%" PRIx64 "%s, %" PRId64 ")", res ? "&result" : "NULL", ss, h,
             is_live_engine(h) ? " [a live engine]" : "", t);
  lmc_status st = result_only ? lmc_job_result(res, (lmc_job *)(uintptr_t)h) : lmc_job_wait(res, (lmc_job *)(uintptr_t)h, t);
  check_status(st);
  int result_bad = !res || ss < 8;
  check_handle_or_result(st, h, 0, result_bad);
  check_result_buf(ss, st == LMC_OK, g_call);
  job_slot *j = job_of(h);
  if (!j || result_bad) return;
  if (t < -1) {
    if (st != LMC_E_INVALID_ARGUMENT && !job_failed_for_its_engine(st, h))
      die("timeout_ms %" PRId64 " < -1 returned %s, not LMC_E_INVALID_ARGUMENT", t, sname(st));
    return;
  }
  check_job_outcome(j, st, res, ss, t);
}

static void op_job_poll(reader *r) {
  uint64_t h = pick_handle(r, 0);
  int null_out = u8(r) == 255;
  int32_t fin = 0x5A5A5A5A;
  set_call("lmc_job_poll(%s, 0x%" PRIx64 "%s)", null_out ? "NULL" : "&finished", h, is_live_engine(h) ? " [a live engine]" : "");
  lmc_status st = lmc_job_poll(null_out ? NULL : &fin, (lmc_job *)(uintptr_t)h);
  check_status(st);
  check_handle_or_result(st, h, 0, null_out);
  if (st != LMC_OK) {
    if (fin != 0x5A5A5A5A) die("finished_out written on failure");
    return;
  }
  if (fin != 0 && fin != 1) die("finished_out = %d, not 0 or 1", fin);
  job_slot *j = job_of(h);
  if (!j) return;
  if (j->finished && fin == 0) die("a job that had finished polls as running");
  if (fin == 1) {
    j->finished = 1;
    /* finished: its result is there without waiting */
    lmc_transfer_result res;
    memset(&res, 0, sizeof res);
    res.struct_size = sizeof res;
    set_call("lmc_job_result(&result, 0x%" PRIx64 ") after lmc_job_poll said finished", h);
    st = lmc_job_result(&res, j->h);
    check_status(st);
    check_job_outcome(j, st, &res, sizeof res, 0);
  }
}

/* ---------------------------------------------------------------------------------------------- */
/* Config, stats, maintenance, lookup server                                                       */
/* ---------------------------------------------------------------------------------------------- */

static char g_cfgbuf[CONFIG_BUF + 64];

/* The size-query protocol shared by lmc_engine_get_config, lmc_engine_get_metrics and
 * lmc_engine_get_tier_nodes over any handle and capacity: statuses pinned; nothing written past the
 * capacity; needed_out written only on LMC_OK / BUFFER_TOO_SMALL; on LMC_OK a NUL-terminated text of
 * exactly needed bytes that starts with what the function promises. */
enum sized_text { TEXT_CONFIG, TEXT_METRICS, TEXT_TIER_NODES };

static void op_sized_text(reader *r, enum sized_text what) {
  static const char *const names[] = {"lmc_engine_get_config", "lmc_engine_get_metrics", "lmc_engine_get_tier_nodes"};
  static const char *const starts[] = {"{", "# HELP lmcache:", "["};
  uint64_t h = pick_handle(r, 1);
  int32_t tier = what == TEXT_TIER_NODES ? (u8(r) < 200 ? (int32_t)(u8(r) % 4) - 1 : any32(r)) : 0;
  uint8_t sel = u8(r);
  char *buf = g_cfgbuf;
  int64_t cap;
  if (sel < 64) buf = NULL, cap = sel < 48 ? 0 : any64(r);
  else if (sel < 128) cap = CONFIG_BUF;
  else if (sel < 240) cap = u16(r) % (what == TEXT_METRICS ? 32768 : 2048);
  else cap = any64(r), cap = cap > CONFIG_BUF ? CONFIG_BUF : cap;
  memset(g_cfgbuf, CANARY, sizeof g_cfgbuf);
  int64_t needed = SENT;
  set_call("%s(&needed, 0x%" PRIx64 ", tier %d, %s, %" PRId64 ")", names[what], h, tier, buf ? "buffer" : "NULL", cap);
  lmc_engine *engine = (lmc_engine *)(uintptr_t)h;
  lmc_status st = what == TEXT_CONFIG    ? lmc_engine_get_config(&needed, engine, buf, cap)
                  : what == TEXT_METRICS ? lmc_engine_get_metrics(&needed, engine, buf, cap)
                                         : lmc_engine_get_tier_nodes(&needed, engine, tier, buf, cap);
  check_status(st);
  check_handle_status(st, h, 1);
  size_t untouched_from = buf && cap > 0 ? (size_t)cap : 0;
  for (size_t i = untouched_from; i < sizeof g_cfgbuf; i++)
    if ((uint8_t)g_cfgbuf[i] != CANARY) die("%s wrote byte %zu of the buffer, past capacity %" PRId64, names[what], i, cap);
  if (st == LMC_OK) {
    if (needed < 1 || needed > cap) die("LMC_OK with needed %" PRId64 " and capacity %" PRId64, needed, cap);
    if (g_cfgbuf[needed - 1] != 0 || strlen(g_cfgbuf) != (size_t)needed - 1 ||
        strncmp(g_cfgbuf, starts[what], strlen(starts[what])) != 0)
      die("%s: not a NUL-terminated text of %" PRId64 " bytes starting with \"%s\"", names[what], needed, starts[what]);
    if (what == TEXT_METRICS && strstr(g_cfgbuf, "NaN")) die("metrics contain NaN");
  } else if (st == LMC_E_BUFFER_TOO_SMALL) {
    if (needed <= cap || needed < 1) die("BUFFER_TOO_SMALL with needed %" PRId64 " and capacity %" PRId64, needed, cap);
  } else if (needed != SENT) die("needed_out written on %s", sname(st));
}

static int64_t g_schema_needed; /* what the first successful size query said (the schema is static) */

/* lmc_config_schema: the size-query protocol (needed_out NULL, buffer NULL with and without a
 * capacity, negative, too small by one, exact, large). Statuses pinned; nothing written on failure but
 * needed_out (on BUFFER_TOO_SMALL); a NUL-terminated JSON array of exactly needed bytes; the same
 * needed every time. */
static void op_config_schema(reader *r) {
  uint8_t sel = u8(r);
  int null_needed = sel == 255;
  char *buf = g_cfgbuf;
  int64_t cap;
  int64_t known = g_schema_needed ? g_schema_needed : 4096;
  switch (sel % 8) {
  case 0: buf = NULL, cap = 0; break;
  case 1: buf = NULL, cap = any64(r); break;
  case 2: cap = known; break;
  case 3: cap = known - 1; break;
  case 4: cap = CONFIG_BUF; break;
  case 5: cap = u16(r) % 4096; break;
  case 6: cap = any64(r); cap = cap > CONFIG_BUF ? CONFIG_BUF : cap; break;
  default: cap = known + 1 + u8(r); break;
  }
  if (cap > CONFIG_BUF && buf) cap = CONFIG_BUF;
  memset(g_cfgbuf, CANARY, sizeof g_cfgbuf);
  int64_t needed = SENT;
  set_call("lmc_config_schema(%s, %s, %" PRId64 ")", null_needed ? "NULL" : "&needed", buf ? "buffer" : "NULL", cap);
  lmc_status st = lmc_config_schema(null_needed ? NULL : &needed, buf, cap);
  check_status(st);
  lmc_status expect;
  if (null_needed || cap < 0 || (!buf && cap > 0)) expect = LMC_E_INVALID_ARGUMENT;
  else if (g_schema_needed && cap < g_schema_needed) expect = LMC_E_BUFFER_TOO_SMALL;
  else if (g_schema_needed) expect = LMC_OK;
  else expect = st == LMC_OK || st == LMC_E_BUFFER_TOO_SMALL ? st : LMC_OK; /* size not known yet */
  if (st != expect) die("returned %s, expected %s", sname(st), sname(expect));
  if (st != LMC_OK)
    for (size_t i = 0; i < sizeof g_cfgbuf; i++)
      if ((uint8_t)g_cfgbuf[i] != CANARY) die("wrote byte %zu of the buffer on %s", i, sname(st));
  if (st == LMC_OK || st == LMC_E_BUFFER_TOO_SMALL) {
    if (needed < 2) die("needed %" PRId64, needed);
    if (g_schema_needed && needed != g_schema_needed) die("needed %" PRId64 ", earlier %" PRId64, needed, g_schema_needed);
    g_schema_needed = needed;
    if (st == LMC_E_BUFFER_TOO_SMALL && needed <= cap) die("BUFFER_TOO_SMALL with needed %" PRId64 " and capacity %" PRId64, needed, cap);
  } else if (!null_needed && needed != SENT) die("needed_out written on %s", sname(st));
  if (st == LMC_OK) {
    if (needed > cap) die("LMC_OK with needed %" PRId64 " and capacity %" PRId64, needed, cap);
    for (size_t i = (size_t)needed; i < sizeof g_cfgbuf; i++)
      if ((uint8_t)g_cfgbuf[i] != CANARY) die("wrote byte %zu past needed %" PRId64, i, needed);
    if (g_cfgbuf[needed - 1] != 0 || strlen(g_cfgbuf) != (size_t)needed - 1 || g_cfgbuf[0] != '[' || g_cfgbuf[needed - 2] != ']' ||
        !strstr(g_cfgbuf, "\"chunk_size\"") || !strstr(g_cfgbuf, "\"name\""))
      die("the schema is not a NUL-terminated JSON array of %" PRId64 " bytes naming chunk_size", needed);
  }
}

static uint8_t g_statbuf[STRUCT_BUF + 64] __attribute__((aligned(16)));

static uint32_t pick_struct_size(reader *r, uint32_t real) {
  static const uint32_t v[] = {0, 1, 4, 7, 8, 9, 12, 16, 40, 41, 100, 127, 129, 135, 137, 256, 4096, STRUCT_BUF};
  uint8_t sel = u8(r);
  if (sel < 160) return real;
  if (sel < 240) return v[sel % (sizeof v / sizeof v[0])];
  return u16(r) % (STRUCT_BUF + 1);
}

/* The library wrote only the first min(struct_size, real) bytes... or at most struct_size. */
static void check_struct_tail(uint32_t ss, lmc_status st, const uint8_t *before) {
  size_t lim = ss;
  if (st != LMC_OK) lim = 0;
  for (size_t i = lim < 4 ? 4 : lim; i < sizeof g_statbuf; i++)
    if (g_statbuf[i] != before[i]) die("wrote byte %zu of a struct with struct_size %u (status %s)", i, ss, sname(st));
  if (st != LMC_OK && memcmp(g_statbuf, before, 4) != 0) die("changed struct_size on failure");
}

static void op_stats(reader *r) {
  uint64_t h = pick_handle(r, 1);
  uint32_t ss = pick_struct_size(r, sizeof(lmc_stats));
  int null_ptr = u8(r) == 255;
  static uint8_t before[sizeof g_statbuf];
  memset(g_statbuf, CANARY, sizeof g_statbuf);
  memcpy(g_statbuf, &ss, 4);
  memcpy(before, g_statbuf, sizeof before);
  set_call("lmc_engine_get_stats(0x%" PRIx64 ", %s struct_size=%u)", h, null_ptr ? "NULL" : "stats", ss);
  lmc_status st = lmc_engine_get_stats((lmc_engine *)(uintptr_t)h, null_ptr ? NULL : (lmc_stats *)g_statbuf);
  check_status(st);
  if (!null_ptr) check_handle_status(st, h, 1);
  if (null_ptr && st == LMC_OK) die("LMC_OK with stats NULL");
  check_struct_tail(ss, st, before);
}

static void op_tier_count(reader *r) {
  uint64_t h = pick_handle(r, 1);
  int null_ptr = u8(r) == 255;
  int32_t count = 0x5A5A5A5A;
  set_call("lmc_engine_tier_count(%s, 0x%" PRIx64 ")", null_ptr ? "NULL" : "&count", h);
  lmc_status st = lmc_engine_tier_count(null_ptr ? NULL : &count, (lmc_engine *)(uintptr_t)h);
  check_status(st);
  if (!null_ptr) check_handle_status(st, h, 1);
  if (null_ptr && st == LMC_OK) die("LMC_OK with count_out NULL");
  if (!null_ptr && st != LMC_OK && count != 0x5A5A5A5A) die("count_out written on failure");
  if (st == LMC_OK && (count < 0 || count > 2)) die("tier count %d", count);
}

static void op_tier_stats(reader *r) {
  uint64_t h = pick_handle(r, 1);
  int32_t idx = u8(r) < 200 ? (int32_t)(u8(r) % 4) - 1 : any32(r);
  uint32_t ss = pick_struct_size(r, sizeof(lmc_tier_stats));
  int null_ptr = u8(r) == 255;
  static uint8_t before[sizeof g_statbuf];
  memset(g_statbuf, CANARY, sizeof g_statbuf);
  memcpy(g_statbuf, &ss, 4);
  memcpy(before, g_statbuf, sizeof before);
  set_call("lmc_engine_get_tier_stats(0x%" PRIx64 ", %d, %s struct_size=%u)", h, idx, null_ptr ? "NULL" : "stats", ss);
  lmc_status st = lmc_engine_get_tier_stats((lmc_engine *)(uintptr_t)h, idx, null_ptr ? NULL : (lmc_tier_stats *)g_statbuf);
  check_status(st);
  if (!null_ptr) check_handle_status(st, h, 1);
  if (null_ptr && st == LMC_OK) die("LMC_OK with stats NULL");
  check_struct_tail(ss, st, before);
  if (st == LMC_OK && ss >= offsetof(lmc_tier_stats, hits) && memchr(g_statbuf + 8, 0, 32) == NULL)
    die("tier name is not NUL-terminated");
}

static void op_flush(reader *r) {
  uint64_t h = pick_handle(r, 1);
  int64_t t = timeout_ms(r);
  set_call("lmc_engine_flush(0x%" PRIx64 ", %" PRId64 ")", h, t);
  lmc_status st = lmc_engine_flush((lmc_engine *)(uintptr_t)h, t);
  check_status(st);
  check_handle_status(st, h, 1);
}

static void op_clear(reader *r) {
  uint64_t h = pick_handle(r, 1);
  set_call("lmc_engine_clear(0x%" PRIx64 ")", h);
  lmc_status st = lmc_engine_clear((lmc_engine *)(uintptr_t)h);
  check_status(st);
  check_handle_status(st, h, 1);
}

/* lmc_engine_poll_events: any capacities, strides and NULLs; on LMC_OK every event must be well
 * formed and inside the caller's arrays, and nothing past them written; on failure the
 * out-parameters are untouched. */
#define POLL_EVENTS_MAX 16
#define POLL_STRIDE_MAX 160
#define POLL_TOKENS_MAX 1024
static uint8_t g_poll_events[POLL_EVENTS_MAX * POLL_STRIDE_MAX + 64];
static int32_t g_poll_tokens[POLL_TOKENS_MAX + 16];

static void op_poll_events(reader *r) {
  static const uint32_t strides[] = {sizeof(lmc_kv_event), sizeof(lmc_kv_event), 0, 8, 103, 112, POLL_STRIDE_MAX};
  uint64_t h = pick_handle(r, 1);
  uint8_t sel = u8(r);
  uint32_t stride = strides[u8(r) % (sizeof strides / sizeof strides[0])];
  int64_t cap_sel = u8(r) < 200 ? (int64_t)(sel % (POLL_EVENTS_MAX + 1)) : any64(r);
  int64_t tok_sel = u8(r);
  int64_t token_cap = tok_sel < 64 ? tok_sel : tok_sel < 200 ? POLL_TOKENS_MAX : any64(r);
  int null_events = (sel & 0x40) && (sel & 0x80);
  int null_tokens = (sel & 0x20) && (sel & 0x80);
  int null_out = (sel & 0x10) && (sel & 0x80) ? 1 + sel % 3 : 0;
  /* Sizes the call may believe: never more than the arrays hold (a caller's honest mistake aside,
   * lying about a buffer's size is outside the contract). Negative ones are passed through. */
  int64_t capacity = cap_sel;
  if (capacity > 0 && stride >= sizeof(lmc_kv_event) && capacity > (int64_t)(POLL_EVENTS_MAX * POLL_STRIDE_MAX / stride))
    capacity = POLL_EVENTS_MAX * POLL_STRIDE_MAX / stride;
  if (token_cap > POLL_TOKENS_MAX) token_cap = POLL_TOKENS_MAX;
  memset(g_poll_events, CANARY, sizeof g_poll_events);
  for (size_t i = 0; i < sizeof g_poll_tokens / sizeof g_poll_tokens[0]; i++) g_poll_tokens[i] = 0x5A5A5A5A;
  int64_t n = -777, ntok = -777;
  uint64_t dropped = 777;
  set_call("lmc_engine_poll_events(%s, %s, %s, 0x%" PRIx64 ", %s, %u, %" PRId64 ", %s, %" PRId64 ")",
           null_out == 1 ? "NULL" : "&n", null_out == 2 ? "NULL" : "&ntok", null_out == 3 ? "NULL" : "&dropped", h,
           null_events ? "NULL" : "events", stride, capacity, null_tokens ? "NULL" : "tokens", token_cap);
  lmc_status st = lmc_engine_poll_events(null_out == 1 ? NULL : &n, null_out == 2 ? NULL : &ntok, null_out == 3 ? NULL : &dropped,
                                         (lmc_engine *)(uintptr_t)h, null_events ? NULL : (lmc_kv_event *)(void *)g_poll_events,
                                         stride, capacity, null_tokens ? NULL : g_poll_tokens, token_cap);
  check_status(st);
  if (!null_out) check_handle_status(st, h, 1);
  if (null_out && st == LMC_OK) die("LMC_OK with an out-parameter NULL");
  if (st != LMC_OK) {
    if (n != -777 || ntok != -777 || dropped != 777) die("out-parameters written on failure");
    return;
  }
  if (n < 0 || n > capacity || ntok < 0 || ntok > token_cap) die("%" PRId64 " events, %" PRId64 " token ids: outside the arrays", n, ntok);
  int64_t used = 0;
  for (int64_t i = 0; i < n; i++) {
    lmc_kv_event e;
    memcpy(&e, g_poll_events + i * stride, sizeof e);
    if (e.struct_size != sizeof e) die("event %" PRId64 ": struct_size %u", i, e.struct_size);
    if (e.kind < LMC_KV_EVENT_BLOCK_STORED || e.kind > LMC_KV_EVENT_ALL_BLOCKS_CLEARED) die("event %" PRId64 ": kind %u", i, e.kind);
    if (e.medium < LMC_KV_MEDIUM_CPU || e.medium > LMC_KV_MEDIUM_REMOTE) die("event %" PRId64 ": medium %u", i, e.medium);
    if (e.kind == LMC_KV_EVENT_ALL_BLOCKS_CLEARED ? e.hash_len != 0 : e.hash_len != 16 && e.hash_len != 32)
      die("event %" PRId64 ": hash_len %u", i, e.hash_len);
    if (e.parent_hash_len != 0 && e.parent_hash_len != e.hash_len) die("event %" PRId64 ": parent_hash_len %u", i, e.parent_hash_len);
    if (e.kind == LMC_KV_EVENT_BLOCK_STORED) {
      if (e.token_ids_offset != used || e.token_ids_count != (int64_t)e.token_count || e.token_count == 0)
        die("event %" PRId64 ": token ids at %" PRId64 " (+%" PRId64 "), token_count %u; expected at %" PRId64, i,
            e.token_ids_offset, e.token_ids_count, e.token_count, used);
      used += e.token_ids_count;
    } else if (e.token_ids_count != 0) {
      die("event %" PRId64 ": %" PRId64 " token ids for a kind without any", i, e.token_ids_count);
    }
    if (stride > sizeof e)
      for (uint32_t b = sizeof e; b < stride; b++)
        if (g_poll_events[i * stride + b] != CANARY) die("event %" PRId64 ": byte %u of the caller's stride written", i, b);
  }
  if (used != ntok) die("events account for %" PRId64 " token ids, the call reported %" PRId64, used, ntok);
  for (int64_t b = n * (int64_t)stride; b < (int64_t)sizeof g_poll_events; b++)
    if (g_poll_events[b] != CANARY) die("events array written past event %" PRId64 " (byte %" PRId64 ")", n, b);
  for (int64_t t = ntok; t < (int64_t)(sizeof g_poll_tokens / sizeof g_poll_tokens[0]); t++)
    if (g_poll_tokens[t] != 0x5A5A5A5A) die("token ids written past the %" PRId64 " reported", ntok);
}

static char g_sock[512];

static void op_server_start(reader *r) {
  uint64_t h = pick_handle(r, 1);
  const char *path = pick_socket(r, g_sock, sizeof g_sock);
  set_call("lmc_lookup_server_start(0x%" PRIx64 ", %s%.200s%s)", h, path ? "\"" : "", path ? path : "NULL", path ? "\"" : "");
  lmc_status st = lmc_lookup_server_start((lmc_engine *)(uintptr_t)h, path);
  check_status(st);
  check_handle_status(st, h, 1);
  struct stat sb;
  if (stat(g_file, &sb) != 0 || !S_ISREG(sb.st_mode)) {
    make_afile();
    die("the regular file %s is gone: lmc_lookup_server_start deleted a file that is not a socket", g_file);
  }
}

static void op_server_stop(reader *r) {
  uint64_t h = pick_handle(r, 1);
  set_call("lmc_lookup_server_stop(0x%" PRIx64 ")", h);
  lmc_status st = lmc_lookup_server_stop((lmc_engine *)(uintptr_t)h);
  check_status(st);
  check_handle_status(st, h, 1);
}

static void op_remote_lookup(reader *r) {
  const char *path = pick_socket(r, g_sock, sizeof g_sock);
  token_args a = pick_tokens(r, NULL, 0);
  extra_key k = pick_extra(r);
  int64_t t = timeout_ms(r);
  int64_t hit = SENT;
  int null_out = u8(r) == 255;
  set_call("lmc_remote_lookup(%s, %s%.200s%s, %s, %" PRId64 ", %s, %" PRId64 ", %" PRId64 ")", null_out ? "NULL" : "&hit",
           path ? "\"" : "", path ? path : "NULL", path ? "\"" : "", a.tokens ? "tokens" : "NULL", a.n,
           k.p ? "key" : "NULL", k.len, t);
  lmc_status st = lmc_remote_lookup(null_out ? NULL : &hit, path, a.tokens, a.n, k.p, k.len, t);
  check_status(st);
  if (st == LMC_E_INVALID_HANDLE) die("remote lookup returned LMC_E_INVALID_HANDLE");
  if (null_out) {
    if (st == LMC_OK) die("LMC_OK with hit_tokens_out NULL");
    return;
  }
  check_count(st, hit, a.n, "hit_tokens_out");
}

static void op_misc(reader *r) {
  uint8_t sel = u8(r);
  switch (sel % 4) {
  case 0: {
    int32_t s = u8(r) < 200 ? (int32_t)(u8(r) % 16) - 13 : any32(r);
    set_call("lmc_status_name(%d)", s);
    const char *name = lmc_status_name(s);
    if (!name) die("NULL");
    if (strcmp(name, sname(s)) != 0) die("lmc_status_name(%d) = \"%s\", expected \"%s\"", s, name, sname(s));
    break;
  }
  case 1: {
    set_call("versions");
    if (lmc_abi_version() != LMC_ABI_VERSION) die("ABI version %d", lmc_abi_version());
    const char *v = lmc_version_string();
    if (!v) die("lmc_version_string() NULL");
    int32_t num = lmc_version_number();
    char expect[64];
    snprintf(expect, sizeof expect, "%d.%d.%d", num / 10000, num / 100 % 100, num % 100);
    if (strcmp(v, expect) != 0) die("version string %s vs number %d", v, num);
    break;
  }
  case 2: {
    int32_t count = 0x5A5A5A5A;
    int null_out = u8(r) == 255;
    set_call("lmc_cuda_device_count(%s) with LMC_CUDA_LIBRARY missing", null_out ? "NULL" : "&count");
    lmc_status st = lmc_cuda_device_count(null_out ? NULL : &count);
    check_status(st);
    if (st == LMC_OK) die("a device count without a driver");
    if (!null_out && count != 0x5A5A5A5A) die("count_out written on failure");
    break;
  }
  default: { /* the other kind of handle, explicitly, to every engine/job function that takes one */
    uint64_t job = pick_handle(r, 0), eng = pick_handle(r, 1);
    lmc_stats stt;
    memset(&stt, 0, sizeof stt);
    stt.struct_size = sizeof stt;
    lmc_status st;
    set_call("lmc_engine_get_stats(job 0x%" PRIx64 ")", job);
    st = lmc_engine_get_stats((lmc_engine *)(uintptr_t)job, &stt);
    check_status(st);
    check_handle_status(st, job, 1);
    set_call("lmc_engine_clear(job 0x%" PRIx64 ")", job);
    st = lmc_engine_clear((lmc_engine *)(uintptr_t)job);
    check_status(st);
    check_handle_status(st, job, 1);
    set_call("lmc_lookup_server_stop(job 0x%" PRIx64 ")", job);
    st = lmc_lookup_server_stop((lmc_engine *)(uintptr_t)job);
    check_status(st);
    check_handle_status(st, job, 1);
    /* the request functions with a well-formed request: nothing may run on a job handle */
    lmc_request q;
    memset(&q, 0, sizeof q);
    q.struct_size = sizeof q;
    q.tokens = g_tokens;
    q.num_tokens = 4;
    q.slot_mapping = g_slots;
    for (int i = 0; i < 4; i++) g_tokens[i] = i, g_slots[i] = i;
    lmc_lookup_result lr;
    memset(&lr, CANARY, sizeof lr);
    lr.struct_size = sizeof lr;
    set_call("lmc_lookup(&result, job 0x%" PRIx64 ", request)", job);
    st = lmc_lookup(&lr, (lmc_engine *)(uintptr_t)job, &q);
    check_status(st);
    check_handle_status(st, job, 1);
    for (int op = OP_STORE; op <= OP_RETRIEVE; op++)
      for (int as_job = 0; as_job < 2; as_job++) {
        lmc_transfer_result tr;
        memset(&tr, CANARY, sizeof tr);
        tr.struct_size = sizeof tr;
        lmc_job *jo = (lmc_job *)(uintptr_t)SENT;
        set_call("%s(&result, job 0x%" PRIx64 ", request, %s)", k_op_names[op], job, as_job ? "&job" : "NULL");
        st = op == OP_STORE ? lmc_store(&tr, (lmc_engine *)(uintptr_t)job, &q, as_job ? &jo : NULL)
                            : lmc_retrieve(&tr, (lmc_engine *)(uintptr_t)job, &q, as_job ? &jo : NULL);
        check_status(st);
        check_handle_status(st, job, 1);
        if (st == LMC_OK) { /* a live engine after all (no job was live): keep what it made */
          if (as_job) add_job(jo, job, op, 4, 0, engine_bpt(slot_of(job)));
          if (as_job && slot_of(job)) slot_of(job)->pending_jobs++;
        } else if ((uintptr_t)jo != (uintptr_t)SENT) die("job_out written on failure");
        else if (tr.reserved != 0xCBCBCBCBu) die("result_out written on failure");
      }
    lmc_job *pj = (lmc_job *)(uintptr_t)SENT;
    set_call("lmc_prefetch_start(&job, job 0x%" PRIx64 ", request)", job);
    st = lmc_prefetch_start(&pj, (lmc_engine *)(uintptr_t)job, &q);
    check_status(st);
    check_handle_status(st, job, 1);
    if (st == LMC_OK) {
      add_job(pj, job, OP_PREFETCH, 4, 0, 0);
      if (slot_of(job)) slot_of(job)->pending_jobs++;
    } else if ((uintptr_t)pj != (uintptr_t)SENT) die("job_out written on failure");
    lmc_transfer_result jr;
    memset(&jr, 0, sizeof jr);
    jr.struct_size = sizeof jr;
    set_call("lmc_job_wait(&result, engine 0x%" PRIx64 ", 0)", eng);
    st = lmc_job_wait(&jr, (lmc_job *)(uintptr_t)eng, 0);
    check_status(st);
    check_handle_status(st, eng, 0);
    set_call("lmc_job_result(&result, engine 0x%" PRIx64 ")", eng);
    st = lmc_job_result(&jr, (lmc_job *)(uintptr_t)eng);
    check_status(st);
    check_handle_status(st, eng, 0);
    int32_t fin = 0x5A5A5A5A;
    set_call("lmc_job_poll(&finished, engine 0x%" PRIx64 ")", eng);
    st = lmc_job_poll(&fin, (lmc_job *)(uintptr_t)eng);
    check_status(st);
    check_handle_status(st, eng, 0);
    if (st != LMC_OK && fin != 0x5A5A5A5A) die("finished_out written on failure");
    if (!is_live_job(eng)) destroy_job_handle(eng);
    if (!is_live_engine(job)) destroy_engine_handle(job);
    check_all_alive("handles of the wrong kind");
    break;
  }
  }
}

/* ---------------------------------------------------------------------------------------------- */
/* Driver                                                                                          */
/* ---------------------------------------------------------------------------------------------- */

static void teardown(void) {
  for (int i = 0; i < MAX_JOBS; i++)
    if (S.jobs[i].live) {
      uint64_t h = (uint64_t)(uintptr_t)S.jobs[i].h;
      lmc_transfer_result res;
      memset(&res, 0, sizeof res);
      res.struct_size = sizeof res;
      set_call("teardown: lmc_job_wait(&result, 0x%" PRIx64 ", -1)", h);
      lmc_status st = lmc_job_wait(&res, S.jobs[i].h, -1);
      check_status(st);
      if ((st == LMC_E_INVALID_HANDLE && !job_failed_for_its_engine(st, h)) || st == LMC_E_TIMEOUT)
        die("a live job answered %s to a wait without bound", sname(st));
      check_job_outcome(&S.jobs[i], st, &res, sizeof res, -1);
      set_call("teardown: lmc_job_destroy(0x%" PRIx64 ")", h);
      lmc_job_destroy(S.jobs[i].h);
      S.jobs[i].live = 0;
      g_old_dead_job = h;
    }
  for (int i = 0; i < MAX_ENGINES; i++)
    if (S.engines[i].live) {
      uint64_t h = (uint64_t)(uintptr_t)S.engines[i].h;
      set_call("teardown: lmc_engine_destroy(0x%" PRIx64 ")", h);
      lmc_engine_destroy(S.engines[i].h);
      g_old_dead_engine = h;
      S.engines[i].live = 0;
      free_engine_memory(&S.engines[i]);
    }
  if (S.layer_bytes != 0) die("harness: layer memory accounting is off by %zu", S.layer_bytes);
  if (S.used_disk) nftw(g_disk, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
  /* sockets and fuzzed names left in the private dir (none should remain but the regular file) */
  DIR *d = opendir(g_dir);
  if (d) {
    struct dirent *de;
    char path[600];
    while ((de = readdir(d)) != NULL) {
      if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..") || !strcmp(de->d_name, "afile")) continue;
      snprintf(path, sizeof path, "%s/%s", g_dir, de->d_name);
      nftw(path, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
    }
    closedir(d);
  }
  memset(&S, 0, sizeof S);
}

#define N_OPS 28 /* operation byte % N_OPS; make_corpus.py mirrors the codes */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  reader r = {data, size};
  memset(&S, 0, sizeof S);
  for (int op = 0; op < MAX_OPS && r.n > 0; op++) {
    uint8_t code = u8(&r);
    switch (code % N_OPS) {
    case 0: case 1: op_create(&r); break;
    case 2: destroy_engine_handle(pick_handle(&r, 1)); break;
    case 3: case 4: op_register(&r); break;
    case 5: op_lookup(&r); break;
    case 6: op_transfer(&r, OP_STORE, 0); break;
    case 7: op_transfer(&r, OP_RETRIEVE, 0); break;
    case 8: case 9: op_roundtrip(&r); break;
    case 10: op_prefetch(&r); break;
    case 11: op_job_wait(&r, 0); break;
    case 12: destroy_job_handle(pick_handle(&r, 0)); break;
    case 13: op_transfer(&r, OP_STORE, 1); break;
    case 14: op_transfer(&r, OP_RETRIEVE, 1); break;
    case 15: op_sized_text(&r, code & 0x80 ? TEXT_METRICS : TEXT_CONFIG); break; /* metrics: high bit */
    case 16: op_stats(&r); break;
    case 17: op_tier_count(&r); break;
    case 18: code & 0x80 ? op_sized_text(&r, TEXT_TIER_NODES) : op_tier_stats(&r); break; /* per-node: high bit */
    case 19: op_flush(&r); break;
    case 20: code & 0x80 ? op_poll_events(&r) : op_clear(&r); break; /* POLL_EVENTS: 20 with bit 7 set */
    case 21: op_server_start(&r); break;
    case 22: code & 0x80 ? op_server_stop(&r) : op_remote_lookup(&r); break;
    case 23: op_misc(&r); break;
    case 24: op_job_poll(&r); break;
    case 25: op_job_wait(&r, 1); break;
    case 26: op_config_schema(&r); break;
    default: op_twin(&r); break;
    }
  }
  teardown();
  return 0;
}
