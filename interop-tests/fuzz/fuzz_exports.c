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
 *      the same tokens, slots and key, returns bit for bit the KV that was stored (for tokens in
 *      [first_token_to_write, min(retrieved, stored))), never more tokens than stored, and writes
 *      nothing else in the harness's layer memory;
 *  I6  no library call writes outside a layer's span (guard bytes around every layer buffer), outside
 *      an output buffer's capacity or past a struct's struct_size;
 *  I7  out-parameters are left untouched on failure (needed_out excepted on BUFFER_TOO_SMALL), and
 *      counts returned on success are within [0, num_tokens];
 *  I8  lmc_lookup_server_start never deletes a file that is not a socket.
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
} engine_slot;

typedef struct {
  lmc_job *h;
  int live;
  uint64_t engine; /* the engine it was started on */
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
    int64_t res = 0;
    set_call("lmc_job_wait(0x%" PRIx64 ", 0) after %s", (uint64_t)(uintptr_t)S.jobs[i].h, saved);
    lmc_status s = lmc_job_wait(&res, S.jobs[i].h, 0);
    check_status(s);
    if (s == LMC_E_INVALID_HANDLE && !job_failed_for_its_engine(s, (uint64_t)(uintptr_t)S.jobs[i].h))
      die("a live job stopped answering after %s", after);
  }
  memcpy(g_call, saved, sizeof saved);
}

static void add_job(lmc_job *h, uint64_t engine) {
  new_handle((uint64_t)(uintptr_t)h, "job");
  for (int i = 0; i < MAX_JOBS; i++)
    if (!S.jobs[i].live) {
      S.jobs[i].h = h;
      S.jobs[i].live = 1;
      S.jobs[i].engine = engine;
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
    "use_gpu_connector_v3",
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
    int64_t res = 0x5A5A;
    set_call("lmc_job_wait(0x%" PRIx64 ", 0) on the job just destroyed", h);
    lmc_status s = lmc_job_wait(&res, (lmc_job *)(uintptr_t)h, 0);
    check_status(s);
    if (s != LMC_E_INVALID_HANDLE) die("a destroyed job answered %s", sname(s));
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
/* Lookup / store / retrieve / async                                                               */
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

static void op_lookup(reader *r) {
  uint64_t h = pick_handle(r, 1);
  token_args a = pick_tokens(r, slot_of(h), 0);
  extra_key k = pick_extra(r);
  int64_t hit = SENT;
  set_call("lmc_lookup(&hit, 0x%" PRIx64 ", %s, %" PRId64 ", %s, %" PRId64 ")", h, a.tokens ? "tokens" : "NULL", a.n,
           k.p ? "key" : "NULL", k.len);
  lmc_status st = lmc_lookup(&hit, (lmc_engine *)(uintptr_t)h, a.tokens, a.n, k.p, k.len);
  check_status(st);
  check_handle_status(st, h, 1);
  check_count(st, hit, a.n, "hit_tokens_out");
}

static void op_store(reader *r, int async) {
  uint64_t h = pick_handle(r, 1);
  engine_slot *e = slot_of(h);
  token_args a = pick_tokens(r, e, 1);
  int64_t skip = u8(r) < 200 ? (int64_t)(u8(r) % 64) : any64(r);
  extra_key k = pick_extra(r);
  int64_t stored = SENT;
  lmc_status st;
  if (async) {
    lmc_job *job = (lmc_job *)(uintptr_t)SENT;
    void *stream = u8(r) == 255 ? (void *)(uintptr_t)0xDEADBEEF : NULL; /* ignored with host layers */
    set_call("lmc_store_async(&job, &stored, 0x%" PRIx64 ", %s, %s, %" PRId64 ", skip=%" PRId64 ", %s, %" PRId64 ", %p)", h,
             a.tokens ? "tokens" : "NULL", a.slots ? "slots" : "NULL", a.n, skip, k.p ? "key" : "NULL", k.len, stream);
    st = lmc_store_async(&job, &stored, (lmc_engine *)(uintptr_t)h, a.tokens, a.slots, a.n, skip, k.p, k.len, stream);
    check_status(st);
    check_handle_status(st, h, 1);
    if (st == LMC_OK) add_job(job, h);
    else if ((uintptr_t)job != (uintptr_t)SENT) die("job_out written on failure");
  } else {
    set_call("lmc_store(&stored, 0x%" PRIx64 ", %s, %s, %" PRId64 ", skip=%" PRId64 ", %s, %" PRId64 ")", h,
             a.tokens ? "tokens" : "NULL", a.slots ? "slots" : "NULL", a.n, skip, k.p ? "key" : "NULL", k.len);
    st = lmc_store(&stored, (lmc_engine *)(uintptr_t)h, a.tokens, a.slots, a.n, skip, k.p, k.len);
    check_status(st);
    check_handle_status(st, h, 1);
  }
  check_count(st, stored, a.n, "stored_tokens_out");
  if (e) check_guards(e, g_call);
}

static void op_retrieve(reader *r, int async) {
  uint64_t h = pick_handle(r, 1);
  engine_slot *e = slot_of(h);
  token_args a = pick_tokens(r, e, 1);
  int64_t first = u8(r) < 200 ? (int64_t)(u8(r) % 64) : any64(r);
  extra_key k = pick_extra(r);
  int64_t got = SENT;
  lmc_status st;
  if (async) {
    lmc_job *job = (lmc_job *)(uintptr_t)SENT;
    set_call("lmc_retrieve_async(&job, &got, 0x%" PRIx64 ", %s, %s, %" PRId64 ", first=%" PRId64 ", %s, %" PRId64 ", NULL)", h,
             a.tokens ? "tokens" : "NULL", a.slots ? "slots" : "NULL", a.n, first, k.p ? "key" : "NULL", k.len);
    st = lmc_retrieve_async(&job, &got, (lmc_engine *)(uintptr_t)h, a.tokens, a.slots, a.n, first, k.p, k.len, NULL);
    check_status(st);
    check_handle_status(st, h, 1);
    if (st == LMC_OK) add_job(job, h);
    else if ((uintptr_t)job != (uintptr_t)SENT) die("job_out written on failure");
  } else {
    set_call("lmc_retrieve(&got, 0x%" PRIx64 ", %s, %s, %" PRId64 ", first=%" PRId64 ", %s, %" PRId64 ")", h,
             a.tokens ? "tokens" : "NULL", a.slots ? "slots" : "NULL", a.n, first, k.p ? "key" : "NULL", k.len);
    st = lmc_retrieve(&got, (lmc_engine *)(uintptr_t)h, a.tokens, a.slots, a.n, first, k.p, k.len);
    check_status(st);
    check_handle_status(st, h, 1);
  }
  check_count(st, got, a.n, "retrieved_tokens_out");
  if (e) check_guards(e, g_call);
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

static uint8_t *g_snap, *g_expect;
static size_t g_snap_cap;

/* I5: store fresh tokens, scramble the layers, retrieve them with the same slots, compare. */
static void op_roundtrip(reader *r) {
  uint64_t h = pick_handle(r, 1);
  engine_slot *e = slot_of(h);
  if (!e || e->nlayers == 0 || !e->cur) return;
  int64_t total = engine_total_slots(e);
  int64_t n = 1 + u16(r) % 600;
  if (n > total) n = total;
  if (n > MAX_TOKENS) n = MAX_TOKENS;
  /* a request never seen in this process (its chunks were never cached): the extra key ends with a
   * counter, and a request with another extra key never hits */
  fill_tokens(r, g_tokens, n);
  g_fresh_counter++;
  /* distinct slots: a shuffled prefix of [0, total) */
  uint64_t s = u64(r) | 1;
  static int64_t perm[1 << 20];
  if (total > (int64_t)(sizeof perm / sizeof perm[0])) return;
  for (int64_t i = 0; i < total; i++) perm[i] = i;
  for (int64_t i = 0; i < n; i++) {
    int64_t j = i + (int64_t)(rng_next(&s) % (uint64_t)(total - i));
    int64_t t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
    g_slots[i] = perm[i];
  }
  extra_key k = {g_extra, 0};
  uint8_t ek = u8(r);
  if (ek >= 128) {
    k.len = ek % 33;
    for (int64_t i = 0; i < k.len; i++) g_extra[i] = u8(r);
  }
  uint64_t unique[2] = {g_fresh_counter, ((uint64_t)getpid() << 32) | 0x4C4D4346u /* "LMCF" */};
  memcpy(g_extra + k.len, unique, sizeof unique);
  k.len += (int64_t)sizeof unique;
  size_t region = e->cur->region;
  uint8_t *mem = e->cur->mem + GUARD;
  if (g_snap_cap < region) {
    free(g_snap);
    free(g_expect);
    g_snap = malloc(region);
    g_expect = malloc(region);
    if (!g_snap || !g_expect) die("out of memory");
    g_snap_cap = region;
  }
  fill_random(mem, region, s ^ 0xA5A5A5A5ull);
  memcpy(g_snap, mem, region);
  int64_t stored = SENT;
  set_call("round trip: lmc_store(&stored, 0x%" PRIx64 ", fresh tokens, distinct slots, %" PRId64 ", 0, key, %" PRId64 ")", h,
           n, k.len);
  lmc_status st = lmc_store(&stored, e->h, g_tokens, g_slots, n, 0, k.p, k.len);
  check_status(st);
  check_count(st, stored, n, "stored_tokens_out");
  check_guards(e, g_call);
  if (memcmp(mem, g_snap, region) != 0) die("lmc_store wrote into the KV layers");
  if (st != LMC_OK || stored == 0) return;
  /* scramble, then retrieve into the same slots */
  fill_random(mem, region, s ^ 0x5A5A5A5A12345ull);
  memcpy(g_expect, mem, region);
  int64_t first = u8(r) < 192 ? 0 : (int64_t)(u16(r) % (uint64_t)(n + 1));
  int64_t got = SENT;
  set_call("round trip: lmc_retrieve(&got, 0x%" PRIx64 ", same tokens, same slots, %" PRId64 ", first=%" PRId64
           ", key, %" PRId64 ") after lmc_store reported %" PRId64 " stored",
           h, n, first, k.len, stored);
  st = lmc_retrieve(&got, e->h, g_tokens, g_slots, n, first, k.p, k.len);
  check_status(st);
  check_count(st, got, n, "retrieved_tokens_out");
  check_guards(e, g_call);
  if (st != LMC_OK) die("retrieve right after a successful store failed: %s %s", sname(st), lmc_last_error_message());
  if (got > stored) die("retrieved %" PRId64 " tokens but only %" PRId64 " were stored (the tokens were fresh)", got, stored);
  int64_t upto = got < stored ? got : stored;
  if (first < upto) {
    copy_ctx c = {g_expect, g_snap};
    for_each_token_bytes(e, g_slots, first, upto, copy_run, &c);
  }
  if (memcmp(mem, g_expect, region) != 0) {
    size_t i = 0;
    while (mem[i] == g_expect[i]) i++;
    die("layer memory after retrieve differs from the stored KV at byte %zu of %zu: got 0x%02x, expected 0x%02x "
        "(stored %" PRId64 ", retrieved %" PRId64 ", first_token_to_write %" PRId64 ", %d layers)",
        i, region, mem[i], g_expect[i], stored, got, first, e->nlayers);
  }
}

static void op_prefetch(reader *r) {
  uint64_t h = pick_handle(r, 1);
  token_args a = pick_tokens(r, slot_of(h), 0);
  extra_key k = pick_extra(r);
  lmc_job *job = (lmc_job *)(uintptr_t)SENT;
  int null_out = u8(r) == 255;
  set_call("lmc_prefetch_start(%s, 0x%" PRIx64 ", %s, %" PRId64 ", %s, %" PRId64 ")", null_out ? "NULL" : "&job", h,
           a.tokens ? "tokens" : "NULL", a.n, k.p ? "key" : "NULL", k.len);
  lmc_status st = lmc_prefetch_start(null_out ? NULL : &job, (lmc_engine *)(uintptr_t)h, a.tokens, a.n, k.p, k.len);
  check_status(st);
  if (null_out) {
    if (st == LMC_OK) die("LMC_OK with job_out NULL");
    return;
  }
  check_handle_status(st, h, 1);
  if (st == LMC_OK) add_job(job, h);
  else if ((uintptr_t)job != (uintptr_t)SENT) die("job_out written on failure");
}

static void op_job_wait(reader *r) {
  uint64_t h = pick_handle(r, 0);
  int64_t t = timeout_ms(r);
  int64_t res = SENT;
  /* a live job is finished quickly by the library (host layers, local tiers), so any timeout is
   * bounded by the job itself */
  set_call("lmc_job_wait(&res, 0x%" PRIx64 "%s, %" PRId64 ")", h, is_live_engine(h) ? " [a live engine]" : "", t);
  lmc_status st = lmc_job_wait(&res, (lmc_job *)(uintptr_t)h, t);
  check_status(st);
  check_handle_status(st, h, 0);
  if (st != LMC_OK && res != SENT) die("result_out written on failure");
  if (st == LMC_OK && res < 0) die("job result %" PRId64 " < 0", res);
}

/* ---------------------------------------------------------------------------------------------- */
/* Config, stats, maintenance, lookup server                                                       */
/* ---------------------------------------------------------------------------------------------- */

static char g_cfgbuf[CONFIG_BUF + 64];

static void op_get_config(reader *r) {
  uint64_t h = pick_handle(r, 1);
  uint8_t sel = u8(r);
  char *buf = g_cfgbuf;
  int64_t cap;
  if (sel < 64) buf = NULL, cap = sel < 48 ? 0 : any64(r);
  else if (sel < 128) cap = CONFIG_BUF;
  else if (sel < 240) cap = u16(r) % 2048;
  else cap = any64(r), cap = cap > CONFIG_BUF ? CONFIG_BUF : cap;
  memset(g_cfgbuf, CANARY, sizeof g_cfgbuf);
  int64_t needed = SENT;
  set_call("lmc_engine_get_config(&needed, 0x%" PRIx64 ", %s, %" PRId64 ")", h, buf ? "buffer" : "NULL", cap);
  lmc_status st = lmc_engine_get_config(&needed, (lmc_engine *)(uintptr_t)h, buf, cap);
  check_status(st);
  check_handle_status(st, h, 1);
  size_t untouched_from = buf && cap > 0 ? (size_t)cap : 0;
  for (size_t i = untouched_from; i < sizeof g_cfgbuf; i++)
    if ((uint8_t)g_cfgbuf[i] != CANARY) die("wrote byte %zu of the config buffer, past capacity %" PRId64, i, cap);
  if (st == LMC_OK) {
    if (needed < 1 || needed > cap) die("LMC_OK with needed %" PRId64 " and capacity %" PRId64, needed, cap);
    if (g_cfgbuf[needed - 1] != 0 || strlen(g_cfgbuf) != (size_t)needed - 1 || g_cfgbuf[0] != '{')
      die("config is not a NUL-terminated JSON object of %" PRId64 " bytes", needed);
  } else if (st == LMC_E_BUFFER_TOO_SMALL) {
    if (needed <= cap || needed < 1) die("BUFFER_TOO_SMALL with needed %" PRId64 " and capacity %" PRId64, needed, cap);
  } else if (needed != SENT) die("needed_out written on %s", sname(st));
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
    int64_t out = SENT;
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
    set_call("lmc_lookup(job 0x%" PRIx64 ")", job);
    st = lmc_lookup(&out, (lmc_engine *)(uintptr_t)job, NULL, 0, NULL, 0);
    check_status(st);
    check_handle_status(st, job, 1);
    set_call("lmc_job_wait(engine 0x%" PRIx64 ", 0)", eng);
    out = SENT;
    st = lmc_job_wait(&out, (lmc_job *)(uintptr_t)eng, 0);
    check_status(st);
    check_handle_status(st, eng, 0);
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
      int64_t res = SENT;
      set_call("teardown: lmc_job_wait(0x%" PRIx64 ", -1)", h);
      lmc_status st = lmc_job_wait(&res, S.jobs[i].h, -1);
      check_status(st);
      if ((st == LMC_E_INVALID_HANDLE && !job_failed_for_its_engine(st, h)) || st == LMC_E_TIMEOUT)
        die("a live job answered %s to a wait without bound", sname(st));
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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  reader r = {data, size};
  memset(&S, 0, sizeof S);
  for (int op = 0; op < MAX_OPS && r.n > 0; op++) {
    uint8_t code = u8(&r);
    switch (code % 24) {
    case 0: case 1: op_create(&r); break;
    case 2: destroy_engine_handle(pick_handle(&r, 1)); break;
    case 3: case 4: op_register(&r); break;
    case 5: op_lookup(&r); break;
    case 6: op_store(&r, 0); break;
    case 7: op_retrieve(&r, 0); break;
    case 8: case 9: op_roundtrip(&r); break;
    case 10: op_prefetch(&r); break;
    case 11: op_job_wait(&r); break;
    case 12: destroy_job_handle(pick_handle(&r, 0)); break;
    case 13: op_store(&r, 1); break;
    case 14: op_retrieve(&r, 1); break;
    case 15: op_get_config(&r); break;
    case 16: op_stats(&r); break;
    case 17: op_tier_count(&r); break;
    case 18: op_tier_stats(&r); break;
    case 19: op_flush(&r); break;
    case 20: op_clear(&r); break;
    case 21: op_server_start(&r); break;
    case 22: code & 0x80 ? op_server_stop(&r) : op_remote_lookup(&r); break;
    default: op_misc(&r); break;
    }
  }
  teardown();
  return 0;
}
