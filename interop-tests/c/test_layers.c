/*
 * test_layers.c — lmc_engine_register_layers: every way to get a description wrong, and every
 * vLLM layout (NHD, HND, blocks-first, packed, padded blocks, MLA; 1-, 2- and 4-byte elements):
 * stored from one layout, retrieved into another, compared byte for byte with padding and guards.
 */
#include "harness.h"

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
  int64_t slots[NTOK];
  lmc_request q;
  lmc_transfer_result r = tr_blank();
  lmc_lookup_result lr = lr_blank();
  lmc_job *job = SENTINEL_JOB;
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
  q = req_slots(tokens, NTOK, slots, 0, NULL);
  s = lmc_lookup(&lr, e, &q);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_lookup before register_layers");
  s = lmc_store(&r, e, &q, NULL);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_store before register_layers");
  s = lmc_retrieve(&r, e, &q, NULL);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_retrieve before register_layers");
  s = lmc_store(&r, e, &q, &job);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_store with a job before register_layers");
  s = lmc_retrieve(&r, e, &q, &job);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_retrieve with a job before register_layers");
  s = lmc_prefetch_start(&job, e, &q);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_prefetch_start before register_layers");
  report(tr_is_blank(&r) && lr_is_blank(&lr) && job == SENTINEL_JOB,
         "failed lookup/store/retrieve/prefetch leave their out-parameters untouched");
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
  s = lmc_lookup(&lr, e, &q);
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
  int64_t slots_src[NTOK], slots_dst[NTOK];
  lmc_transfer_result r;
  lmc_request q;
  lmc_status s;
  int i;
  int64_t token_bytes;
  snprintf(what, sizeof what, "layouts, elem_size %d, from %s", (int)elem_size,
           layout_name(src_kind));
  e = create_engine("{\"chunk_size\": 8, \"max_local_cpu_size\": 0.01}", what);
  if (!e) return;
  ls_init(&src, src_kind, src_kind, elem_size);
  /* bytes of one token over both layers */
  token_bytes = (int64_t)MAXL * src.desc[0].kv_count * src.desc[0].num_kv_heads *
                src.desc[0].head_size * elem_size;
  ls_pattern(&src, (unsigned)elem_size * 7u + (unsigned)src_kind);
  make_tokens(tok, NTOK, 50 + elem_size);
  make_slots(slots_src, NTOK, 5, 3);
  make_slots(slots_dst, NTOK, 7, 1);
  slots_dst[13] = -1;
  s = lmc_engine_register_layers(e, src.desc, src.nlayers);
  EXPECT(s, LMC_OK, "register_layers: %s, elem_size %d", layout_name(src_kind), (int)elem_size);
  if (s == LMC_OK) {
    lmc_transfer_result st = expect_store(e, tok, slots_src, NTOK, 0, NULL, NTOK, what);
    check_tr(&st, NTOK, NTOK, 0, token_bytes, what);
    for (i = 0; i < ndst; i++) {
      layout_set dst, expect;
      char where[200];
      int same;
      ls_init(&dst, dst_kinds[i][0], dst_kinds[i][1], elem_size);
      ls_clone(&expect, &dst);
      s = lmc_engine_register_layers(e, dst.desc, dst.nlayers);
      EXPECT(s, LMC_OK, "register_layers: layer 0 %s, layer 1 %s, elem_size %d",
             layout_name(dst_kinds[i][0]), layout_name(dst_kinds[i][1]), (int)elem_size);
      r = tr_blank();
      q = req_slots(tok, NTOK, slots_dst, 4, NULL);
      s = lmc_retrieve(&r, e, &q, NULL);
      capture_message();
      report(s == LMC_OK && r.tokens_matched == NTOK && r.tokens_copied == NTOK - 4 - 1 &&
                 r.bytes_copied == r.tokens_copied * token_bytes,
             "retrieve into layer 0 %s / layer 1 %s (elem_size %d) -> %s, %s (want matched %d, "
             "copied %d, bytes = copied x %lld) %s",
             layout_name(dst_kinds[i][0]), layout_name(dst_kinds[i][1]), (int)elem_size, sname(s),
             tr_str(&r), NTOK, NTOK - 4 - 1, (long long)token_bytes, g_msg);
      if (s == LMC_OK) ls_apply_retrieve(&expect, &src, slots_src, slots_dst, 4, r.tokens_matched);
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


int main(void) {
  harness_init();
  test_register_invalid();
  test_layouts();
  return harness_finish("layers");
}
