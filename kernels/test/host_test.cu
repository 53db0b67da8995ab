/*
 * host_test.cu — the kernels' addressing, run on the host, against the library's C# reference copy.
 *
 *   host_test [cases] [seed]          (build.sh: nvcc -ccbin clang-14, linked with liblmcache_native.so)
 *
 * Each case draws a random model (element size 1/2/4, K+V or MLA, layers, heads, head size), two
 * random paged layouts of it (any order of the kv/block/token/head dimensions, so NHD, HND,
 * blocks-first and packed [B,H,N,2D] all occur, with random padding between dimensions and random
 * base misalignment, which forces every vector width from 16 down to 1 byte), a random chunk size,
 * random tokens and random slot mappings with -1 entries, and a random first_token_to_write. Then:
 *
 *   gather   the block body of kv_transfer.cuh, called for every (block, thread) of the launch grid
 *            exactly as a GPU would run it, gathers layout A into chunk objects. Compared with
 *            (a) a naive element-by-element reference written independently here, and (b) the chunk
 *            objects the LIBRARY builds with lmc_store (C# HostKvTransfer), read back through the C
 *            ABI by retrieving into a "canonical" layout whose memory IS the chunk format.
 *   scatter  the library's chunk objects are scattered by the emulated kernel into layout B (random
 *            background, guard bytes around every layer); compared with (a) the naive reference and
 *            (b) lmc_retrieve into the same layout B from the same background (whole buffers,
 *            guards included).
 *   every    emulated access is checked to be aligned to the launch's vector width (a GPU faults on
 *            a misaligned vector access, a CPU does not) and to lie inside a layer or chunk object.
 *
 * Prints "ok - ..." / "not ok - ..." per check and "# host_test: N passed, M failed"; exit 1 on failure.
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

/* splitmix64: <random> does not get through nvcc 11.8's front end with gcc 12's libstdc++. */
struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed) {}
  uint64_t operator()() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
};
template <typename T> static void shuffle(T *first, T *last, Rng &rng) {
  for (int64_t i = (int64_t)(last - first) - 1; i > 0; i--) {
    int64_t j = (int64_t)(rng() % (uint64_t)(i + 1));
    T tmp = first[i];
    first[i] = first[j];
    first[j] = tmp;
  }
}
template <typename T> static T min_of(T a, T b) { return a < b ? a : b; }

/* ---- access hook: alignment and bounds of every emulated access (defined before the header) ---- */
struct Range {
  uintptr_t begin, end;
};
static std::vector<Range> g_paged_ranges, g_object_ranges;
static long g_bad_alignment, g_bad_bounds, g_accesses;
static int g_max_reports = 10;

static bool in_ranges(const std::vector<Range> &ranges, uintptr_t p, int v) {
  for (const Range &r : ranges)
    if (p >= r.begin && p + (uintptr_t)v <= r.end) return true;
  return false;
}

__attribute__((used)) static void access_hook(const void *paged, const void *object, int v) {
  uintptr_t pg = (uintptr_t)paged, ob = (uintptr_t)object;
  g_accesses++;
  if ((pg | ob) % (uintptr_t)v != 0) {
    if (g_max_reports-- > 0) printf("#   misaligned %d-byte access: paged %#lx object %#lx\n", v, (unsigned long)pg, (unsigned long)ob);
    g_bad_alignment++;
  }
  if (!in_ranges(g_paged_ranges, pg, v) || !in_ranges(g_object_ranges, ob, v)) {
    if (g_max_reports-- > 0) printf("#   out-of-bounds %d-byte access: paged %#lx object %#lx\n", v, (unsigned long)pg, (unsigned long)ob);
    g_bad_bounds++;
  }
}
#define LMC_EMU_HOOK(paged, object, v) access_hook((const void *)(paged), (const void *)(object), (v))

#include "../kv_transfer.cuh"
#include "lmcache_native.h"

static_assert(sizeof(lmc_k_layer) == 40, "lmc_k_layer is 40 bytes (C# mirror)");
static_assert(sizeof(lmc_k_chunk) == 16, "lmc_k_chunk is 16 bytes (C# mirror)");
static_assert(sizeof(lmc_k_params) == 80, "lmc_k_params is 80 bytes (C# mirror)");

/* One synchronous store or retrieve through the C ABI with a slot mapping; tokens_matched on success. */
static lmc_status transfer(lmc_status (*call)(lmc_transfer_result *, lmc_engine *, const lmc_request *, lmc_job **),
                           lmc_engine *e, const int32_t *tokens, const int64_t *slots, int64_t n, int64_t first,
                           int64_t *matched_out) {
  lmc_request req;
  memset(&req, 0, sizeof req);
  req.struct_size = sizeof req;
  req.destination_kind = LMC_DESTINATION_SLOTS;
  req.tokens = tokens;
  req.num_tokens = n;
  req.first_token = first;
  req.slot_mapping = slots;
  lmc_transfer_result result;
  memset(&result, 0, sizeof result);
  result.struct_size = sizeof result;
  lmc_status status = call(&result, e, &req, NULL);
  if (status == LMC_OK) *matched_out = result.tokens_matched;
  return status;
}

/* ---- reporting ---- */
static int g_passed, g_failed;
static void report(bool ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void report(bool ok, const char *fmt, ...) {
  va_list ap;
  printf("%s - ", ok ? "ok" : "not ok");
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  printf("\n");
  fflush(stdout);
  (ok ? g_passed : g_failed)++;
}

/* ---- a paged KV cache of several layers, in host memory with guard bytes ---- */
enum Axis { KV = 0, BLOCK = 1, TOKEN = 2, HEAD = 3 };
static const char *kAxisName[4] = {"2", "B", "N", "H"};

struct Model {
  int es, kv, layers, heads, hsize;
};

struct Layout {
  int nblocks, bsize;
  int order[4];      /* outermost first; d is innermost */
  int64_t stride[4]; /* elements, by Axis */
  int64_t pad[4];    /* padding added to each dimension's stride, by Axis */
  int64_t elems;     /* elements from base to one past the last */
  int misalign;      /* base offset in elements from a 64-byte boundary */
  std::string name;
};

static const size_t kGuard = 64; /* bytes before and after each layer */

struct Cache {
  Model m;
  Layout lay;
  std::vector<uint8_t *> mem; /* per layer: kGuard + misalign + data + kGuard */
  size_t bytes = 0;           /* allocation per layer */
  Cache(const Model &model, const Layout &layout) : m(model), lay(layout) {
    bytes = kGuard + (size_t)lay.misalign * m.es + (size_t)lay.elems * m.es + kGuard;
    for (int l = 0; l < m.layers; l++) mem.push_back((uint8_t *)aligned_alloc(64, (bytes + 63) / 64 * 64));
  }
  Cache(const Cache &) = delete;
  ~Cache() {
    for (uint8_t *p : mem) free(p);
  }
  uint8_t *base(int l) const { return mem[l] + kGuard + (size_t)lay.misalign * m.es; }
  int64_t slots() const { return (int64_t)lay.nblocks * lay.bsize; }
  /* Byte address of (kv, slot, head, d=0) in layer l, from this test's own model of the layout. */
  uint8_t *at(int l, int kv, int64_t slot, int head) const {
    int64_t block = slot / lay.bsize, token = slot % lay.bsize;
    int64_t e = kv * lay.stride[KV] + block * lay.stride[BLOCK] + token * lay.stride[TOKEN] + head * lay.stride[HEAD];
    return base(l) + e * m.es;
  }
  lmc_kv_layer_desc desc(int l) const {
    lmc_kv_layer_desc d;
    memset(&d, 0, sizeof d);
    d.struct_size = sizeof d;
    d.device_kind = LMC_DEVICE_HOST;
    d.elem_size = m.es;
    d.kv_count = m.kv;
    d.num_blocks = lay.nblocks;
    d.block_size = lay.bsize;
    d.num_kv_heads = m.heads;
    d.head_size = m.hsize;
    d.base_address = (uint64_t)(uintptr_t)base(l);
    d.span_bytes = (uint64_t)lay.elems * m.es;
    d.kv_stride = lay.stride[KV];
    d.block_stride = lay.stride[BLOCK];
    d.token_stride = lay.stride[TOKEN];
    d.head_stride = lay.stride[HEAD];
    return d;
  }
  void fill_random(Rng &rng) {
    for (uint8_t *p : mem)
      for (size_t i = 0; i < bytes; i++) p[i] = (uint8_t)rng();
  }
  void copy_from(const Cache &o) {
    for (int l = 0; l < m.layers; l++) memcpy(mem[l], o.mem[l], bytes);
  }
};

static int64_t extent_of(const Model &m, int axis, const Layout &lay) {
  switch (axis) {
  case KV: return m.kv;
  case BLOCK: return lay.nblocks;
  case TOKEN: return lay.bsize;
  default: return m.heads;
  }
}

/* Row-major over `order` (outermost first) with d innermost, plus padding per dimension. */
static Layout make_layout(const Model &m, const int order[4], int nblocks, int bsize, Rng &rng, bool padded,
                          int misalign, const char *label) {
  Layout lay;
  lay.nblocks = nblocks;
  lay.bsize = bsize;
  memcpy(lay.order, order, sizeof lay.order);
  static const int64_t pads[] = {0, 0, 1, 2, 3, 5, 8, 24};
  int64_t stride = m.hsize;
  for (int i = 3; i >= 0; i--) {
    int axis = order[i];
    lay.pad[axis] = padded ? pads[rng() % 8] : 0;
    lay.stride[axis] = stride + lay.pad[axis];
    stride = lay.stride[axis] * extent_of(m, axis, lay);
  }
  lay.elems = stride;
  lay.misalign = misalign;
  lay.name = std::string(label) + " [";
  for (int i = 0; i < 4; i++) {
    lay.name += kAxisName[order[i]];
    if (lay.pad[order[i]]) lay.name += "+" + std::to_string(lay.pad[order[i]]);
    lay.name += ",";
  }
  lay.name += "D]";
  if (misalign) lay.name += " base+" + std::to_string(misalign);
  return lay;
}

/* ---- the launcher's work (mirrored by src/LMCacheNative.Cuda/CudaKvTransfer.cs) ---- */
struct Launch {
  std::vector<lmc_k_layer> layers;
  std::vector<lmc_k_chunk> chunks;
  lmc_k_params p;
  uint32_t gx, gy, gz, threads;
  int v;
};

static Launch make_launch(const Cache &c, const std::vector<lmc_k_chunk> &chunks, const int64_t *slots, int64_t slot_base,
                          int64_t first_token_to_write, int chunk_tokens, bool narrow_blocks) {
  Launch L;
  const Model &m = c.m;
  bool heads_adjacent = m.heads == 1 || c.lay.stride[HEAD] == m.hsize;
  int64_t row_bytes = (int64_t)m.heads * m.hsize * m.es;
  int64_t seg_bytes = heads_adjacent ? row_bytes : (int64_t)m.hsize * m.es;
  uint64_t bits = (uint64_t)row_bytes | (uint64_t)seg_bytes;
  for (int l = 0; l < m.layers; l++) {
    lmc_k_layer k;
    k.base = (uint64_t)(uintptr_t)c.base(l);
    k.kv_stride = c.lay.stride[KV] * m.es;
    k.block_stride = c.lay.stride[BLOCK] * m.es;
    k.token_stride = c.lay.stride[TOKEN] * m.es;
    k.head_stride = c.lay.stride[HEAD] * m.es;
    bits |= k.base;
    if (m.kv > 1) bits |= (uint64_t)k.kv_stride;
    if (c.lay.nblocks > 1) bits |= (uint64_t)k.block_stride;
    if (c.lay.bsize > 1) bits |= (uint64_t)k.token_stride;
    if (!heads_adjacent) bits |= (uint64_t)k.head_stride;
    L.layers.push_back(k);
  }
  for (const lmc_k_chunk &ch : chunks) bits |= ch.data;
  L.chunks = chunks;
  L.v = lmc_k_vector_width(bits);
  memset(&L.p, 0, sizeof L.p);
  L.p.layers = L.layers.data();
  L.p.chunks = L.chunks.data();
  L.p.slots = slots;
  L.p.slot_base = slot_base;
  L.p.first_token_to_write = first_token_to_write;
  L.p.row_bytes = row_bytes;
  L.p.seg_bytes = seg_bytes;
  L.p.num_layers = m.layers;
  L.p.kv_count = m.kv;
  L.p.block_size = c.lay.bsize;
  L.p.chunk_tokens = chunk_tokens;
  L.p.segs_per_row = heads_adjacent ? 1 : m.heads;
  L.p.units_per_seg = (int32_t)(seg_bytes / L.v);
  L.gx = (uint32_t)(chunks.size() * (size_t)chunk_tokens);
  L.gy = (uint32_t)m.layers;
  L.gz = (uint32_t)m.kv;
  L.threads = narrow_blocks ? 32 : (uint32_t)lmc_k_block_threads((int64_t)L.p.segs_per_row * L.p.units_per_seg);
  return L;
}

template <int V, bool G> static void run_grid(const Launch &L) {
  for (uint32_t z = 0; z < L.gz; z++)
    for (uint32_t y = 0; y < L.gy; y++)
      for (uint32_t x = 0; x < L.gx; x++)
        for (uint32_t t = 0; t < L.threads; t++) lmc_kv_transfer_block<V, G>(L.p, x, y, z, t, L.threads);
}

static void emulate(const Launch &L, bool gather) {
  switch (L.v * 2 + (gather ? 1 : 0)) {
#define LMC_TEST_CASE(V, GATHER, NAME) \
  case V * 2 + (GATHER ? 1 : 0): run_grid<V, GATHER>(L); break;
    LMC_KV_TRANSFER_KERNELS(LMC_TEST_CASE)
#undef LMC_TEST_CASE
  default: fprintf(stderr, "no kernel for V=%d\n", L.v); exit(2);
  }
}

static void set_ranges(const Cache &c, const std::vector<std::vector<uint8_t>> &objects) {
  g_paged_ranges.clear();
  g_object_ranges.clear();
  for (int l = 0; l < c.m.layers; l++) {
    uintptr_t b = (uintptr_t)c.base(l);
    g_paged_ranges.push_back({b, b + (uintptr_t)(c.lay.elems * c.m.es)});
  }
  for (const auto &o : objects) g_object_ranges.push_back({(uintptr_t)o.data(), (uintptr_t)(o.data() + o.size())});
}

/* ---- the test ---- */
struct Totals {
  long cases = 0, gather_naive_bad = 0, gather_lib_bad = 0, gather_lib_rows = 0, scatter_lib_bad = 0, scatter_naive_bad = 0,
       count_bad = 0, lib_errors = 0, scatter_bytes = 0;
  bool v_seen[17] = {};
  bool es_seen[5] = {};
  bool mla = false, kv2 = false, heads_adjacent = false, per_head = false, minus_one = false, first_token = false,
       partial = false, narrow = false;
};

static const int kOrders[][4] = {
    {KV, BLOCK, TOKEN, HEAD},  /* FlashAttention NHD [2,B,N,H,D] */
    {KV, BLOCK, HEAD, TOKEN},  /* FlashAttention HND / CPU SDPA [2,B,H,N,D] */
    {BLOCK, KV, TOKEN, HEAD},  /* blocks-first NHD [B,2,N,H,D] (FlashInfer) */
    {BLOCK, KV, HEAD, TOKEN},  /* blocks-first HND [B,2,H,N,D] */
    {BLOCK, HEAD, TOKEN, KV},  /* packed [B,H,N,2D] */
};
static const char *kOrderNames[] = {"NHD", "HND", "blocks-first NHD", "blocks-first HND", "packed"};

static void random_order(Rng &rng, int order[4], std::string &label, long case_index) {
  if (case_index < 40 || rng() % 2 == 0) {
    int k = (int)(case_index < 40 ? case_index % 5 : rng() % 5);
    memcpy(order, kOrders[k], sizeof kOrders[k]);
    label = kOrderNames[k];
  } else {
    int a[4] = {KV, BLOCK, TOKEN, HEAD};
    shuffle(a, a + 4, rng);
    memcpy(order, a, sizeof a);
    label = "permuted";
  }
}

static void fail_detail(const char *what, long case_index, const std::string &desc, const char *extra) {
  if (g_max_reports-- > 0) printf("#   case %ld: %s mismatch (%s) %s\n", case_index, what, desc.c_str(), extra);
}

static void run_case(long ci, Rng &rng, Totals &tot) {
  static const int kEs[] = {1, 2, 4};
  static const int kHsize[] = {1, 3, 8, 16, 24, 64, 72, 128};
  Model m;
  m.es = kEs[rng() % 3];
  m.kv = rng() % 4 == 0 ? 1 : 2;
  m.layers = 1 + (int)(rng() % 3);
  m.heads = m.kv == 1 ? 1 : 1 + (int)(rng() % 4);
  m.hsize = kHsize[rng() % 8];
  bool aligned_case = rng() % 3 == 0; /* no padding, no misalignment: the 16-byte path when sizes allow */
  static const int kMis[] = {0, 0, 1, 2, 3, 8};
  int order_a[4], order_b[4];
  std::string label_a, label_b;
  random_order(rng, order_a, label_a, ci);
  random_order(rng, order_b, label_b, ci + 1);
  Layout la = make_layout(m, order_a, 2 + (int)(rng() % 7), 1 + (int)(rng() % 8), rng, !aligned_case,
                          aligned_case ? 0 : kMis[rng() % 6], label_a.c_str());
  Layout lb = make_layout(m, order_b, 2 + (int)(rng() % 7), 1 + (int)(rng() % 8), rng, !aligned_case && rng() % 2,
                          aligned_case ? 0 : kMis[rng() % 6], label_b.c_str());
  Cache A(m, la), B(m, lb), B_emu(m, lb), B_background(m, lb);
  static const int kChunk[] = {1, 2, 3, 4, 8, 16};
  const int cs = kChunk[rng() % 6];
  const bool save_unfull = rng() % 2 == 0;
  const int64_t max_n = min_of<int64_t>(min_of(A.slots(), B.slots()), 48);
  const int64_t n = 1 + (int64_t)(rng() % (uint64_t)max_n);
  char descbuf[512];
  snprintf(descbuf, sizeof descbuf, "es=%d kv=%d L=%d H=%d D=%d cs=%d n=%ld unfull=%d A=%s NB=%d BS=%d B=%s NB=%d BS=%d", m.es,
           m.kv, m.layers, m.heads, m.hsize, cs, (long)n, (int)save_unfull, la.name.c_str(), la.nblocks, la.bsize,
           lb.name.c_str(), lb.nblocks, lb.bsize);
  const std::string desc = descbuf;
  tot.cases++;
  tot.es_seen[m.es] = true;
  (m.kv == 1 ? tot.mla : tot.kv2) = true;

  std::vector<int32_t> tokens(n);
  for (auto &t : tokens) t = (int32_t)(rng() % 50000);
  auto random_slots = [&](int64_t nslots, int minus_one_per_mille) {
    std::vector<int64_t> all(nslots);
    for (int64_t i = 0; i < nslots; i++) all[i] = i;
    shuffle(all.data(), all.data() + all.size(), rng);
    std::vector<int64_t> s(all.begin(), all.begin() + n);
    for (auto &x : s)
      if ((int)(rng() % 1000) < minus_one_per_mille) x = -1;
    return s;
  };
  std::vector<int64_t> slots_a = random_slots(A.slots(), rng() % 2 ? 0 : 60);
  A.fill_random(rng);

  const int64_t nchunks = (n + cs - 1) / cs;
  auto tokens_in = [&](int64_t c) { return (int32_t)min_of<int64_t>(cs, n - c * cs); };
  const int64_t row_bytes = (int64_t)m.heads * m.hsize * m.es;
  auto object_bytes = [&](int64_t c) { return (size_t)m.kv * m.layers * tokens_in(c) * row_bytes; };
  if (n % cs) tot.partial = true;

  /* 1. Emulated gather of every chunk from A. Objects start filled with 0xEE (skipped rows stay so). */
  std::vector<std::vector<uint8_t>> emu_objects(nchunks);
  std::vector<lmc_k_chunk> chunk_refs;
  for (int64_t c = 0; c < nchunks; c++) {
    emu_objects[c].assign(object_bytes(c), 0xEE);
    chunk_refs.push_back({(uint64_t)(uintptr_t)emu_objects[c].data(), (int32_t)(c * cs), tokens_in(c)});
  }
  const bool narrow = rng() % 3 == 0;
  tot.narrow |= narrow;
  Launch g = make_launch(A, chunk_refs, slots_a.data(), 0, 0, cs, narrow);
  tot.v_seen[g.v] = true;
  (g.p.segs_per_row == 1 ? tot.heads_adjacent : tot.per_head) = true;
  set_ranges(A, emu_objects);
  emulate(g, true);

  /* 1a. naive reference of the gather */
  bool gather_ok = true;
  for (int64_t c = 0; c < nchunks && gather_ok; c++)
    for (int32_t t = 0; t < tokens_in(c) && gather_ok; t++) {
      int64_t slot = slots_a[c * cs + t];
      if (slot < 0) tot.minus_one = true;
      for (int kv = 0; kv < m.kv; kv++)
        for (int l = 0; l < m.layers; l++)
          for (int h = 0; h < m.heads; h++) {
            const uint8_t *got = emu_objects[c].data() + (((int64_t)kv * m.layers + l) * tokens_in(c) + t) * row_bytes +
                                 (int64_t)h * m.hsize * m.es;
            for (int64_t b = 0; b < (int64_t)m.hsize * m.es; b++) {
              uint8_t want = slot < 0 ? 0xEE : A.at(l, kv, slot, h)[b];
              if (got[b] != want) {
                char extra[128];
                snprintf(extra, sizeof extra, "chunk %ld t %d kv %d layer %d head %d byte %ld", (long)c, t, kv, l, h, (long)b);
                fail_detail("gather vs naive", ci, desc, extra);
                gather_ok = false;
                goto gather_done;
              }
            }
          }
    }
gather_done:
  if (!gather_ok) tot.gather_naive_bad++;

  /* 2. The library stores from A (C# HostKvTransfer). */
  char config[160];
  snprintf(config, sizeof config, "{\"chunk_size\": %d, \"save_unfull_chunk\": %s, \"max_local_cpu_size\": 0.05}", cs,
           save_unfull ? "true" : "false");
  lmc_engine *e = NULL;
  if (lmc_engine_create(&e, config, "host-test", 1, 0) != LMC_OK) {
    printf("#   case %ld: engine_create: %s\n", ci, lmc_last_error_message());
    tot.lib_errors++;
    return;
  }
  std::vector<lmc_kv_layer_desc> descs;
  for (int l = 0; l < m.layers; l++) descs.push_back(A.desc(l));
  int64_t stored = 0, retrieved = 0, retrieved_b = 0;
  if (lmc_engine_register_layers(e, descs.data(), m.layers) != LMC_OK ||
      transfer(lmc_store, e, tokens.data(), slots_a.data(), n, 0, &stored) != LMC_OK) {
    printf("#   case %ld: register/store: %s (%s)\n", ci, lmc_last_error_message(), desc.c_str());
    tot.lib_errors++;
    lmc_engine_destroy(e);
    return;
  }

  /* 3. Read the library's chunk objects back: a canonical layout whose memory is the chunk format,
   *    [chunk = block][kv][layer][t = token][H][D] with layer l starting l * cs rows in. */
  std::vector<std::vector<uint8_t>> lib_objects;
  if (stored > 0) {
    const int64_t row = (int64_t)m.heads * m.hsize;
    const int64_t kv_stride = (int64_t)m.layers * cs * row, block_stride = (int64_t)m.kv * kv_stride;
    std::vector<uint8_t> canon((size_t)(nchunks * block_stride * m.es), 0xCC);
    std::vector<lmc_kv_layer_desc> cd;
    for (int l = 0; l < m.layers; l++) {
      lmc_kv_layer_desc d;
      memset(&d, 0, sizeof d);
      d.struct_size = sizeof d;
      d.device_kind = LMC_DEVICE_HOST;
      d.elem_size = m.es;
      d.kv_count = m.kv;
      d.num_blocks = (int32_t)nchunks;
      d.block_size = cs;
      d.num_kv_heads = m.heads;
      d.head_size = m.hsize;
      d.base_address = (uint64_t)(uintptr_t)(canon.data() + (size_t)l * cs * row * m.es);
      d.span_bytes = (uint64_t)(canon.size() - (size_t)l * cs * row * m.es);
      d.kv_stride = kv_stride;
      d.block_stride = block_stride;
      d.token_stride = row;
      d.head_stride = m.hsize;
      cd.push_back(d);
    }
    std::vector<int64_t> identity(n);
    for (int64_t i = 0; i < n; i++) identity[i] = i;
    if (lmc_engine_register_layers(e, cd.data(), m.layers) != LMC_OK ||
        transfer(lmc_retrieve, e, tokens.data(), identity.data(), n, 0, &retrieved) != LMC_OK) {
      printf("#   case %ld: canonical retrieve: %s (%s)\n", ci, lmc_last_error_message(), desc.c_str());
      tot.lib_errors++;
      lmc_engine_destroy(e);
      return;
    }
    if (retrieved != stored) {
      printf("#   case %ld: stored %ld tokens but retrieved %ld\n", ci, (long)stored, (long)retrieved);
      tot.count_bad++;
    }
    /* 3a. compare with the emulated gather, row by row */
    const int64_t rchunks = (retrieved + cs - 1) / cs;
    bool lib_ok = true;
    for (int64_t c = 0; c < rchunks; c++) {
      lib_objects.emplace_back(object_bytes(c));
      for (int kv = 0; kv < m.kv; kv++)
        for (int l = 0; l < m.layers; l++)
          for (int32_t t = 0; t < tokens_in(c); t++) {
            const uint8_t *lib_row = canon.data() + (size_t)((c * block_stride + kv * kv_stride + t * row) * m.es) +
                                     (size_t)l * cs * row * m.es;
            const int64_t off = lmc_chunk_row_offset(kv, l, m.layers, t, tokens_in(c), row_bytes);
            memcpy(lib_objects.back().data() + off, lib_row, (size_t)row_bytes);
            tot.gather_lib_rows++;
            if (lib_ok && memcmp(emu_objects[c].data() + off, lib_row, (size_t)row_bytes) != 0) {
              char extra[96];
              snprintf(extra, sizeof extra, "chunk %ld kv %d layer %d t %d", (long)c, kv, l, t);
              fail_detail("gather vs library", ci, desc, extra);
              lib_ok = false;
            }
          }
    }
    if (!lib_ok) tot.gather_lib_bad++;
  }
  /* The engine's rule: whole chunks up to the first chunk with a -1 slot; the partial last chunk only
   * with save_unfull_chunk. */
  int64_t expect_stored = 0;
  for (int64_t c = 0; c < nchunks; c++) {
    bool has_minus_one = false;
    for (int32_t t = 0; t < tokens_in(c); t++) has_minus_one |= slots_a[c * cs + t] < 0;
    if (has_minus_one || (tokens_in(c) < cs && !save_unfull)) break;
    expect_stored += tokens_in(c);
  }
  if (stored != expect_stored) {
    printf("#   case %ld: the library stored %ld tokens, expected %ld (%s)\n", ci, (long)stored, (long)expect_stored, desc.c_str());
    tot.count_bad++;
  }

  /* 4. Scatter into layout B: the library (lmc_retrieve) and the emulated kernel, same background. */
  std::vector<int64_t> slots_b = random_slots(B.slots(), rng() % 2 ? 0 : 150);
  const int64_t first = rng() % 3 == 0 ? 0 : (int64_t)(rng() % (uint64_t)(n + 1));
  if (first > 0) tot.first_token = true;
  B_background.fill_random(rng);
  B.copy_from(B_background);
  B_emu.copy_from(B_background);
  descs.clear();
  for (int l = 0; l < m.layers; l++) descs.push_back(B.desc(l));
  if (lmc_engine_register_layers(e, descs.data(), m.layers) != LMC_OK ||
      transfer(lmc_retrieve, e, tokens.data(), slots_b.data(), n, first, &retrieved_b) != LMC_OK) {
    printf("#   case %ld: retrieve into B: %s (%s)\n", ci, lmc_last_error_message(), desc.c_str());
    tot.lib_errors++;
    lmc_engine_destroy(e);
    return;
  }
  lmc_engine_destroy(e);
  if (retrieved_b != retrieved) {
    printf("#   case %ld: retrieved %ld tokens, then %ld into B\n", ci, (long)retrieved, (long)retrieved_b);
    tot.count_bad++;
  }
  const int64_t rchunks = (retrieved_b + cs - 1) / cs;
  if (rchunks > (int64_t)lib_objects.size()) {
    tot.count_bad++;
    return;
  }
  std::vector<lmc_k_chunk> scatter_refs;
  std::vector<std::vector<uint8_t>> used;
  for (int64_t c = first / cs; c < rchunks; c++) {
    scatter_refs.push_back({(uint64_t)(uintptr_t)lib_objects[c].data(), (int32_t)(c * cs), tokens_in(c)});
  }
  if (!scatter_refs.empty()) {
    /* Only the slots the launch needs are uploaded: [first chunk's first token, end). */
    const int64_t slot_base = scatter_refs.front().first_token;
    Launch s = make_launch(B_emu, scatter_refs, slots_b.data() + slot_base, slot_base, first, cs, rng() % 3 == 0);
    tot.v_seen[s.v] = true;
    set_ranges(B_emu, lib_objects);
    emulate(s, false);
  }
  /* 4a. library == emulation over the whole allocations, guards included */
  bool lib_ok = true;
  for (int l = 0; l < m.layers && lib_ok; l++)
    if (memcmp(B.mem[l], B_emu.mem[l], B.bytes) != 0) {
      size_t i = 0;
      while (B.mem[l][i] == B_emu.mem[l][i]) i++;
      char extra[96];
      snprintf(extra, sizeof extra, "layer %d allocation byte %zu (guard %zu)", l, i, kGuard);
      fail_detail("scatter vs library", ci, desc, extra);
      lib_ok = false;
    }
  if (!lib_ok) tot.scatter_lib_bad++;
  tot.scatter_bytes += (long)B.bytes * m.layers;

  /* 4b. naive reference of the scatter */
  B.copy_from(B_background);
  for (int64_t i = first; i < retrieved_b; i++) {
    if (slots_b[i] < 0) continue;
    const int64_t c = i / cs;
    const int32_t t = (int32_t)(i % cs);
    for (int kv = 0; kv < m.kv; kv++)
      for (int l = 0; l < m.layers; l++)
        for (int h = 0; h < m.heads; h++)
          memcpy(B.at(l, kv, slots_b[i], h),
                 lib_objects[c].data() + lmc_chunk_row_offset(kv, l, m.layers, t, tokens_in(c), row_bytes) +
                     (int64_t)h * m.hsize * m.es,
                 (size_t)m.hsize * m.es);
  }
  bool naive_ok = true;
  for (int l = 0; l < m.layers; l++)
    if (memcmp(B.mem[l], B_emu.mem[l], B.bytes) != 0) naive_ok = false;
  if (!naive_ok) {
    fail_detail("scatter vs naive", ci, desc, "");
    tot.scatter_naive_bad++;
  }
}

int main(int argc, char **argv) {
  const long cases = argc > 1 ? atol(argv[1]) : 2000;
  const unsigned long long seed = argc > 2 ? strtoull(argv[2], NULL, 0) : 20240611ull;
  setvbuf(stdout, NULL, _IOLBF, 0);
  printf("# host_test: %ld random cases, seed %llu\n", cases, seed);

  /* Vector width rule and launch geometry helpers. */
  report(lmc_k_vector_width(0) == 16 && lmc_k_vector_width(4096) == 16 && lmc_k_vector_width(24) == 8 &&
             lmc_k_vector_width(4) == 4 && lmc_k_vector_width(6) == 2 && lmc_k_vector_width(7) == 1 &&
             lmc_k_vector_width(0x7f0000000010ull | 2048) == 16,
         "lmc_k_vector_width: largest power of two <= 16 dividing every address, stride and length");
  report(lmc_k_block_threads(1) == 32 && lmc_k_block_threads(33) == 64 && lmc_k_block_threads(128) == 128 &&
             lmc_k_block_threads(100000) == 128,
         "lmc_k_block_threads: whole warps, 32..128");

  Rng rng(seed);
  Totals tot;
  for (long ci = 0; ci < cases; ci++) run_case(ci, rng, tot);

  report(tot.lib_errors == 0, "library calls (create, register, store, retrieve) succeeded in all %ld cases", tot.cases);
  report(tot.gather_naive_bad == 0, "gather: emulated kernel == naive element-by-element reference (%ld cases, %ld failed)",
         tot.cases, tot.gather_naive_bad);
  report(tot.gather_lib_bad == 0 && tot.gather_lib_rows > 0,
         "gather: emulated kernel == chunk objects of the library's lmc_store (C# reference), %ld rows (%ld cases failed)",
         tot.gather_lib_rows, tot.gather_lib_bad);
  report(tot.scatter_lib_bad == 0,
         "scatter: emulated kernel == the library's lmc_retrieve into the same layout, byte for byte incl. guards (%ld bytes, %ld cases failed)",
         tot.scatter_bytes, tot.scatter_lib_bad);
  report(tot.scatter_naive_bad == 0, "scatter: emulated kernel == naive reference (%ld cases failed)", tot.scatter_naive_bad);
  report(tot.count_bad == 0, "token counts: stored as the chunk rules say, retrieved == stored for both retrieves (%ld cases differ)", tot.count_bad);
  report(g_bad_alignment == 0, "every emulated access is aligned to its launch's vector width (%ld accesses, %ld misaligned)",
         g_accesses, g_bad_alignment);
  report(g_bad_bounds == 0, "every emulated access lies inside a layer or a chunk object (%ld outside)", g_bad_bounds);
  report(tot.v_seen[16] && tot.v_seen[8] && tot.v_seen[4] && tot.v_seen[2] && tot.v_seen[1],
         "coverage: vector widths 16/8/4/2/1 = %d%d%d%d%d", tot.v_seen[16], tot.v_seen[8], tot.v_seen[4], tot.v_seen[2],
         tot.v_seen[1]);
  report(tot.es_seen[1] && tot.es_seen[2] && tot.es_seen[4] && tot.mla && tot.kv2 && tot.heads_adjacent && tot.per_head,
         "coverage: elem sizes 1/2/4, kv_count 1 and 2, one run per row (NHD/MLA) and one per head (HND/packed)");
  report(tot.minus_one && tot.first_token && tot.partial && tot.narrow,
         "coverage: slot -1, first_token_to_write > 0, partial chunks, blocks narrower than a row");

  printf("# host_test: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed ? 1 : 0;
}
