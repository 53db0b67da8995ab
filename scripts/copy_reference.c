/* scripts/copy_reference.c — what the hardware allows for the engine's host copies (not a test).
 *
 *   gcc -O2 -mavx512f -pthread scripts/copy_reference.c -o /tmp/copy_reference
 *   /tmp/copy_reference [threads] [head bytes] [tokens]      (defaults: 2, 256, 8192)
 *
 * Models the benchmark's 8192-token Llama-3-8B request (32 layers, K and V, 8 heads x 256 bytes,
 * 16-token blocks in random order, 256-token chunks; 1 GiB; head bytes 128 models fp8) in plain C
 * and times, in turn within each of 9 rounds (so load and clock drift hit every variant alike):
 *   memcpy    glibc memcpy of the same bytes, split over the threads (the benchmark's baseline);
 *   gather / scatter NHD  one 32 KiB block per copy (what the engine's store / retrieve do);
 *   gather / scatter HND  one 256-byte head vector per copy, walked head by head ("h-outer": the
 *             paged side in order) or token by token ("t-outer": the chunk side in order);
 * each with ordinary stores (memcpy), 16-byte streaming stores (SSE2), 64-byte streaming stores
 * (AVX-512), and 16-byte streaming stores that prefetch, one line per line copied, the same offset
 * in the block copied next ("sse2 + next", what the shipped library does). Items (chunk, layer, K/V) are dealt round-robin to
 * the threads, as the engine's Parallel.For deals them. Prints GB/s (10^9 B/s), best and median,
 * and the median over rounds of each round's memcpy time / variant time (the pair timed in turn).
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

enum { LAYERS = 32, HEADS = 8, BLOCK = 16, CHUNK = 256, ROUNDS = 15 };
static size_t HEAD_BYTES = 256, TOKENS = 8192;
enum Kind { MEMCPY, GATHER_NHD, SCATTER_NHD, GATHER_HND_H, GATHER_HND_T, SCATTER_HND_H, SCATTER_HND_T };
enum Store { PLAIN, SSE2_NT, AVX512_NT, SSE2_NT_NEXT };

static const char *kind_names[] = {"memcpy", "gather NHD", "scatter NHD", "gather HND h-outer",
                                   "gather HND t-outer", "scatter HND h-outer", "scatter HND t-outer"};
static const char *store_names[] = {"ordinary", "sse2 stream", "avx512 stream", "sse2 + next"};

static size_t total_bytes, block_bytes, num_blocks;
static uint8_t *paged[LAYERS], *chunks, *memcpy_source;
static int *block_order, thread_count = 2;
static enum Kind kind;
static enum Store store;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Where this thread's next block starts, and the offset of the current copy in its block (prefetch). */
static __thread const uint8_t *next_block;
static __thread size_t offset_in_block;

static void copy(uint8_t *d, const uint8_t *s, size_t n) /* n: a multiple of 64 */
{
    if (store == SSE2_NT_NEXT) {
        const uint8_t *ahead = next_block ? next_block + offset_in_block : s;
        for (size_t i = 0; i < n; i += 64) {
            _mm_prefetch((const char *)(ahead + i), _MM_HINT_T0);
            for (size_t j = i; j < i + 64; j += 16) _mm_stream_si128((__m128i *)(d + j), _mm_loadu_si128((const __m128i *)(s + j)));
        }
    } else if (store == PLAIN) {
        memcpy(d, s, n);
    } else if (store == SSE2_NT) {
        for (size_t i = 0; i < n; i += 16) _mm_stream_si128((__m128i *)(d + i), _mm_loadu_si128((const __m128i *)(s + i)));
    } else {
        for (size_t i = 0; i < n; i += 64) _mm512_stream_si512((void *)(d + i), _mm512_loadu_si512(s + i));
    }
}

static void *work(void *arg)
{
    long id = (long)arg;
    if (kind == MEMCPY) {
        size_t share = total_bytes / thread_count;
        memcpy(chunks + id * share, memcpy_source + id * share, share);
        return NULL;
    }
    int items = (int)(TOKENS / CHUNK * LAYERS * 2);
    for (int item = id; item < items; item += thread_count) {
        int chunk = item / (LAYERS * 2), layer = item / 2 % LAYERS, kv = item % 2;
        uint8_t *rows = chunks + ((size_t)chunk * LAYERS * 2 + layer * 2 + kv) * CHUNK * HEADS * HEAD_BYTES;
        for (int j = 0; j < CHUNK / BLOCK; j++) {
            uint8_t *block = paged[layer] + ((size_t)kv * num_blocks + block_order[chunk * (CHUNK / BLOCK) + j]) * block_bytes;
            uint8_t *row = rows + (size_t)j * block_bytes;
            /* The block this thread copies next: the item's next one, or the first of its next item. */
            int next_item = j + 1 < CHUNK / BLOCK ? item : item + thread_count, next_j = j + 1 < CHUNK / BLOCK ? j + 1 : 0;
            int next_chunk = next_item / (LAYERS * 2), next_layer = next_item / 2 % LAYERS, next_kv = next_item % 2;
            const uint8_t *next_paged = next_item < items ? paged[next_layer] + ((size_t)next_kv * num_blocks + block_order[next_chunk * (CHUNK / BLOCK) + next_j]) * block_bytes : NULL;
            const uint8_t *next_rows = next_item < items ? chunks + ((size_t)next_chunk * LAYERS * 2 + next_layer * 2 + next_kv) * CHUNK * HEADS * HEAD_BYTES + (size_t)next_j * block_bytes : NULL;
            int gathering = kind == GATHER_NHD || kind == GATHER_HND_H || kind == GATHER_HND_T;
            next_block = gathering ? next_paged : next_rows;
            offset_in_block = 0;
            if (kind == GATHER_NHD) copy(row, block, block_bytes);
            else if (kind == SCATTER_NHD) copy(block, row, block_bytes);
            else
                for (int a = 0; a < (kind == GATHER_HND_H || kind == SCATTER_HND_H ? HEADS : BLOCK); a++)
                    for (int b = 0; b < (kind == GATHER_HND_H || kind == SCATTER_HND_H ? BLOCK : HEADS); b++) {
                        int h = kind == GATHER_HND_H || kind == SCATTER_HND_H ? a : b;
                        int t = kind == GATHER_HND_H || kind == SCATTER_HND_H ? b : a;
                        uint8_t *p = block + ((size_t)h * BLOCK + t) * HEAD_BYTES, *c = row + ((size_t)t * HEADS + h) * HEAD_BYTES;
                        offset_in_block = gathering ? (size_t)(p - block) : (size_t)(c - row);
                        if (gathering) copy(c, p, HEAD_BYTES);
                        else copy(p, c, HEAD_BYTES);
                    }
        }
    }
    _mm_sfence();
    return NULL;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    if (argc > 1) thread_count = atoi(argv[1]);
    if (argc > 2) HEAD_BYTES = (size_t)atoi(argv[2]);
    if (argc > 3) TOKENS = (size_t)atoi(argv[3]);
    if (thread_count < 1 || thread_count > 64 || HEAD_BYTES < 64 || HEAD_BYTES % 64 || TOKENS < CHUNK || TOKENS % CHUNK) return 2;
    block_bytes = (size_t)BLOCK * HEADS * HEAD_BYTES;
    total_bytes = (size_t)TOKENS * LAYERS * 2 * HEADS * HEAD_BYTES;
    num_blocks = TOKENS / BLOCK * 9 / 8;
    for (int l = 0; l < LAYERS; l++) {
        paged[l] = aligned_alloc(4096, 2 * num_blocks * block_bytes);
        memset(paged[l], l, 2 * num_blocks * block_bytes);
    }
    chunks = aligned_alloc(2 << 20, total_bytes); /* the engine's pool: huge-page advised */
    madvise(chunks, total_bytes, MADV_HUGEPAGE);
    memset(chunks, 1, total_bytes);
    memcpy_source = aligned_alloc(4096, total_bytes);
    memset(memcpy_source, 3, total_bytes);
    block_order = malloc(sizeof(int) * num_blocks);
    for (size_t i = 0; i < num_blocks; i++) block_order[i] = (int)i;
    srand(1);
    for (size_t i = num_blocks - 1; i > 0; i--) {
        size_t j = (size_t)rand() % (i + 1);
        int swap = block_order[i];
        block_order[i] = block_order[j];
        block_order[j] = swap;
    }

    struct { enum Kind kind; enum Store store; } variants[64];
    int count = 0;
    variants[count].kind = MEMCPY, variants[count++].store = PLAIN;
    for (int k = GATHER_NHD; k <= SCATTER_HND_T; k++)
        for (int s = PLAIN; s <= SSE2_NT_NEXT; s++) variants[count].kind = k, variants[count++].store = s;
    double seconds[64][ROUNDS];
    for (int round = 0; round < ROUNDS; round++)
        for (int v = 0; v < count; v++) {
            kind = variants[v].kind, store = variants[v].store;
            pthread_t threads[64];
            double started = now();
            for (long t = 0; t < thread_count; t++) pthread_create(&threads[t], NULL, work, (void *)t);
            for (int t = 0; t < thread_count; t++) pthread_join(threads[t], NULL);
            seconds[v][round] = now() - started;
        }
    /* Paired: the median over rounds of memcpy time / variant time (timed in turn within a round, so
     * load that comes and goes over seconds cancels in each pair), before the columns are sorted. */
    double paired[64];
    for (int v = 0; v < count; v++) {
        double ratios[ROUNDS];
        for (int round = 0; round < ROUNDS; round++) ratios[round] = seconds[0][round] / seconds[v][round];
        qsort(ratios, ROUNDS, sizeof(double), by_value);
        paired[v] = ratios[ROUNDS / 2];
    }
    for (int v = 0; v < count; v++) qsort(seconds[v], ROUNDS, sizeof(double), by_value);
    printf("%d threads, %zu-byte heads, %zu tokens, %.2f GiB per copy, %d rounds\n", thread_count, HEAD_BYTES, TOKENS, total_bytes / 1073741824.0, ROUNDS);
    for (int v = 0; v < count; v++)
        printf("%-22s %-14s best %5.1f  median %5.1f GB/s  / memcpy (paired median) %.2f\n", kind_names[variants[v].kind],
               store_names[variants[v].store], total_bytes / seconds[v][0] / 1e9, total_bytes / seconds[v][ROUNDS / 2] / 1e9,
               paired[v]);
    return 0;
}
