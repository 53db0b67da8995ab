/*
 * lmcache_native.h — the C ABI of LMCacheNative (liblmcache_native.so).
 *
 * LMCacheNative stores the KV cache an inference engine computed for a token prefix, finds it again
 * for any later request that shares the prefix, and writes it back into the engine's paged KV cache.
 * This header is the library's only public surface. It includes nothing but <stdint.h>.
 *
 * Conventions (they hold for every function below unless its comment says otherwise):
 *  - Functions return an lmc_status: LMC_OK (0) or a negative LMC_E_* value. Values are pinned and
 *    never renumbered; new ones are only appended.
 *  - On failure, lmc_last_error_message() on the SAME thread says why. Out-parameters are left
 *    untouched on failure, and a failed call changes no cached data.
 *  - Out-parameters come first and are named *_out; they must not be NULL.
 *  - Pointers passed in are borrowed for the duration of the call only; the library keeps none of
 *    them, except the KV layer memory registered with lmc_engine_register_layers (see there).
 *  - Every function may be called from any thread. Calls on one engine are serialised internally
 *    where they must be; a lookup can run while another thread stores or retrieves.
 *  - No input, however wrong (NULL, a destroyed handle, lengths that do not match, a slot past the
 *    cache), crashes the process: each such call returns a status instead.
 *  - Versioned structs start with `uint32_t struct_size`, which the caller sets to sizeof(the struct
 *    it was compiled with). The library reads or writes only that many bytes, so older callers keep
 *    working when fields are appended.
 */
#ifndef LMCACHE_NATIVE_H
#define LMCACHE_NATIVE_H

#include <stdint.h>

#ifdef __cplusplus
#define LMC_BEGIN_DECL extern "C" {
#define LMC_END_DECL }
#else
#define LMC_BEGIN_DECL
#define LMC_END_DECL
#endif

#define LMC_API __attribute__((visibility("default")))

LMC_BEGIN_DECL

/* ---------------------------------------------------------------------------------------------- */
/* Versions                                                                                        */
/* ---------------------------------------------------------------------------------------------- */

#define LMC_VERSION_MAJOR 0
#define LMC_VERSION_MINOR 3
#define LMC_VERSION_PATCH 0
/* MAJOR * 10000 + MINOR * 100 + PATCH. MINOR grows when functions are added without breaking the
 * ABI: 0.3 added lmc_engine_get_metrics, lmc_engine_get_tier_nodes and lmc_engine_poll_events, so a
 * program that calls them checks lmc_version_number() >= 300 before it does. */
#define LMC_VERSION_NUMBER (LMC_VERSION_MAJOR * 10000 + LMC_VERSION_MINOR * 100 + LMC_VERSION_PATCH)
/* Bumped only when the ABI breaks (a signature, struct layout or status value changes). Bindings
 * must refuse to run against a library whose lmc_abi_version() differs from the value they know. */
#define LMC_ABI_VERSION 2

/** Library version as LMC_VERSION_NUMBER of the built library. */
LMC_API int32_t lmc_version_number(void);
/** ABI version of the built library (compare with LMC_ABI_VERSION). */
LMC_API int32_t lmc_abi_version(void);
/** Version as "MAJOR.MINOR.PATCH"; static storage, never NULL. */
LMC_API const char *lmc_version_string(void);

/* ---------------------------------------------------------------------------------------------- */
/* Status codes and errors                                                                         */
/* ---------------------------------------------------------------------------------------------- */

typedef int32_t lmc_status;
#define LMC_OK 0
#define LMC_E_INVALID_ARGUMENT (-1) /* NULL where not allowed, bad lengths, bad config or layout */
#define LMC_E_INVALID_HANDLE (-2)   /* NULL, unknown, destroyed or other-kind (job/engine) handle */
#define LMC_E_UNSUPPORTED (-3)      /* valid but not supported by this build (key, device, size) */
#define LMC_E_OUT_OF_MEMORY (-4)    /* host memory for the pool could not be allocated */
#define LMC_E_NOT_FOUND (-5)        /* the requested item does not exist */
#define LMC_E_IO (-6)               /* a storage tier failed (disk, network) */
#define LMC_E_CUDA (-7)             /* a CUDA driver call failed; the message names the error */
#define LMC_E_NO_DEVICE (-8)        /* CUDA requested but no driver or no GPU on this machine */
#define LMC_E_BUFFER_TOO_SMALL (-9) /* an output buffer is too small; the needed size is reported */
#define LMC_E_INTERNAL (-10)        /* a bug in the library; the message carries the details */
#define LMC_E_TIMEOUT (-11)         /* a wait ended before the work did; the work goes on */
/* Values above are stable. New codes are appended below LMC_E_TIMEOUT. */

/** Name of a status ("LMC_OK", "LMC_E_INVALID_ARGUMENT", …; "LMC_E_UNKNOWN" for other values).
 *  Static storage, never NULL, thread-safe. The statuses are 0, -1, -2, … without gaps, so a binding
 *  learns them all by asking for names from 0 downwards until "LMC_E_UNKNOWN". */
LMC_API const char *lmc_status_name(lmc_status status);

/** UTF-8 message of the last failed call on the calling thread; "" when the last call on this
 *  thread succeeded. Never NULL. The functions that cannot fail (versions, lmc_status_name and this
 *  one) leave the message unchanged. Owned by the library and valid until the next lmc_* call on the
 *  same thread: copy it if you need it longer. */
LMC_API const char *lmc_last_error_message(void);

/* ---------------------------------------------------------------------------------------------- */
/* Engine                                                                                          */
/* ---------------------------------------------------------------------------------------------- */

/** Opaque engine handle. A destroyed handle is never reused, so using it again returns
 *  LMC_E_INVALID_HANDLE instead of touching freed memory. Handles are unique across kinds: an
 *  lmc_job passed where an lmc_engine is expected (or the reverse) is LMC_E_INVALID_HANDLE and
 *  leaves both objects untouched. */
typedef struct lmc_engine lmc_engine;

/**
 * Creates an engine.
 *
 * @param[out] engine_out   receives the handle.
 * @param[in]  config_json  UTF-8 JSON object with LMCache's configuration keys, or NULL / "" for all
 *                          defaults. Keys and defaults follow LMCache: "chunk_size" (256),
 *                          "local_cpu" (true), "max_local_cpu_size" (GB of host memory, 5.0),
 *                          "save_unfull_chunk" (false), "pre_caching_hash_algorithm" ("sha256";
 *                          "xxh3_128" is faster; LMCache's "builtin" means "sha256" here), … —
 *                          README.md lists them all. An unknown, repeated or invalid key fails with
 *                          LMC_E_INVALID_ARGUMENT and a message naming the key; a known key whose
 *                          feature this build lacks fails with LMC_E_UNSUPPORTED.
 * @param[in]  model_name   UTF-8 model name (invalid UTF-8 is refused); part of every key's
 *                          namespace. Not NULL, may be "".
 * @param[in]  world_size   tensor-parallel size (>= 1); part of the namespace.
 * @param[in]  worker_id    tensor-parallel rank in [0, world_size); part of the namespace.
 * @return LMC_OK, LMC_E_INVALID_ARGUMENT, LMC_E_UNSUPPORTED.
 */
LMC_API lmc_status lmc_engine_create(lmc_engine **engine_out, const char *config_json,
                                     const char *model_name, int32_t world_size, int32_t worker_id);

/** Destroys an engine and frees its cache. NULL, already destroyed handles and handles that are
 *  not engines (a job) are a no-op; for the last two lmc_last_error_message() says why. Waits
 *  for calls in flight on other threads to finish. The registered KV memory is not touched. */
LMC_API void lmc_engine_destroy(lmc_engine *engine);

/**
 * Writes the engine's resolved configuration as a NUL-terminated UTF-8 JSON object. Credentials
 * are redacted: a URL's password and the value of any key named like a secret (password, token,
 * auth, …) read "***".
 *
 * @param[out] needed_out  receives the size in bytes including the NUL, also on BUFFER_TOO_SMALL.
 * @param[out] buffer      destination; may be NULL when capacity is 0 (to ask for the size).
 * @return LMC_OK, LMC_E_INVALID_HANDLE, LMC_E_INVALID_ARGUMENT, LMC_E_BUFFER_TOO_SMALL.
 */
LMC_API lmc_status lmc_engine_get_config(int64_t *needed_out, lmc_engine *engine, char *buffer,
                                         int64_t capacity);

/**
 * The configuration keys lmc_engine_create accepts, as a NUL-terminated UTF-8 JSON array with one
 * object per key: {"name", "type" ("integer", "number", "boolean", "string" or "object"),
 * "default", "nullable", "description"} and, where they apply, "minimum", "maximum",
 * "exclusive_minimum" (true when the minimum itself is refused), "choices" (accepted strings) and
 * "unsupported_values" (accepted by LMCache, refused here as LMC_E_UNSUPPORTED). Bindings read it
 * instead of repeating the keys. Same size-query protocol as lmc_engine_get_config; needs no engine.
 *
 * @return LMC_OK, LMC_E_INVALID_ARGUMENT, LMC_E_BUFFER_TOO_SMALL.
 */
LMC_API lmc_status lmc_config_schema(int64_t *needed_out, char *buffer, int64_t capacity);

/* ---------------------------------------------------------------------------------------------- */
/* KV layer registration: the paged KV cache described as data                                    */
/* ---------------------------------------------------------------------------------------------- */

typedef int32_t lmc_device_kind;
#define LMC_DEVICE_HOST 0 /* host memory (vLLM's CPU backend) */
#define LMC_DEVICE_CUDA 1 /* CUDA device memory (needs the CUDA path) */

/**
 * One attention layer's paged KV cache. The element at (kv, block, token-in-block, head, d) is at
 *
 *     base_address + elem_size * (kv * kv_stride + block * block_stride + token * token_stride
 *                                 + head * head_stride + d)
 *
 * for kv < kv_count, block < num_blocks, token < block_size, head < num_kv_heads, d < head_size.
 * The head dimension d is contiguous (stride 1). Strides are in ELEMENTS, not bytes, and are what
 * torch's Tensor.stride() reports. Every vLLM layout is expressible:
 *
 *   FlashAttention NHD  [2, B, N, H, D]: kv=B*N*H*D block=N*H*D token=H*D head=D
 *   FlashAttention HND  logical [2, B, N, H, D], physical [2, B, H, N, D]: token=D head=N*D
 *   blocks-first        [B, 2, N, H, D] (FlashInfer, Triton): kv=N*H*D block=2*N*H*D
 *   packed              [B, H, N, 2D] (K = [..., :D], V = [..., D:]): kv=D token=2D head=N*2D
 *   MLA                 [B, N, C]: kv_count=1, num_kv_heads=1, head_size=C
 *   CPU SDPA            [2, B, H, N, D]: like FlashAttention HND
 *
 * Several layers may describe the very same memory (vLLM's KV sharing between layers); otherwise
 * layers must not overlap.
 *
 * Layers in GPU memory (device_kind LMC_DEVICE_CUDA) take the device's pointers (torch's
 * Tensor.data_ptr()) and its ordinal (Tensor.device.index); see "CUDA" below.
 */
typedef struct lmc_kv_layer_desc {
  uint32_t struct_size;        /* sizeof(lmc_kv_layer_desc) */
  lmc_device_kind device_kind; /* LMC_DEVICE_HOST or LMC_DEVICE_CUDA */
  int32_t device_index;        /* CUDA device ordinal; 0 for host */
  int32_t elem_size;           /* bytes per element: 1 (fp8/int8), 2 (fp16/bf16) or 4 (fp32) */
  int32_t kv_count;            /* 2 (K and V) or 1 (MLA) */
  int32_t num_blocks;          /* blocks in the paged cache (>= 1) */
  int32_t block_size;          /* tokens per block (>= 1) */
  int32_t num_kv_heads;        /* KV heads of this rank (>= 1) */
  int32_t head_size;           /* elements per head (>= 1) */
  int32_t reserved;            /* must be 0 */
  uint64_t base_address;       /* address of element (0,0,0,0,0); aligned to elem_size */
  uint64_t span_bytes;         /* bytes addressable from base_address; every element must lie within */
  int64_t kv_stride;           /* elements between K and V (ignored when kv_count == 1) */
  int64_t block_stride;        /* elements between consecutive blocks */
  int64_t token_stride;        /* elements between consecutive tokens of one block */
  int64_t head_stride;         /* elements between consecutive heads of one token */
} lmc_kv_layer_desc;

/**
 * Registers the engine's KV layers, in model layer order. All layers must agree on device, element
 * size, kv_count, num_blocks, block_size, num_kv_heads and head_size; strides may differ per layer.
 * The key namespace takes element size, kv_count, num_kv_heads, head_size and the layer count
 * from them (not num_blocks, block_size or strides: cached chunks do not depend on the layout). The engine checks each description
 * (sizes, strides that address each element once, alignment, bounds within span_bytes, overlap
 * between layers) and refuses a bad one with a message that names the layer and the field.
 *
 * The memory stays owned by the caller and must stay valid until the engine is destroyed or
 * re-registered. Registering again replaces the previous layers; if the namespace changes the
 * cache is cleared. It is cleared too when the pool's memory changes kind: host layers use plain
 * host memory, CUDA layers pinned host memory (so switching between host and CUDA layers clears it).
 * Registering waits for asynchronous transfers still running on the previous layers.
 *
 * CUDA layers (LMC_DEVICE_CUDA): all layers on one device, device_index in [0, device count). The
 * engine checks with the driver that both ends of every layer are memory of that device. The CUDA
 * driver (libcuda.so.1) is loaded on the first such registration, never earlier; the library does
 * not depend on it otherwise.
 *
 * @param[in] layers      array of num_layers descriptions; each struct_size must be set.
 * @return LMC_OK, LMC_E_INVALID_HANDLE, LMC_E_INVALID_ARGUMENT (also: device_index out of range,
 *         memory not of that CUDA device), LMC_E_UNSUPPORTED (CUDA layers in a build without the
 *         CUDA path, a cache of 2^31 slots or more, more than 65535 layers), LMC_E_NO_DEVICE (CUDA
 *         layers on a machine without the CUDA driver or without a usable GPU: the message says
 *         which), LMC_E_CUDA (the driver failed; the message names the call and the error).
 */
LMC_API lmc_status lmc_engine_register_layers(lmc_engine *engine, const lmc_kv_layer_desc *layers,
                                              int32_t num_layers);

/* ---------------------------------------------------------------------------------------------- */
/* Requests: lookup, store, retrieve, prefetch                                                     */
/* ---------------------------------------------------------------------------------------------- */
/*
 * Tokens are cut into chunks of chunk_size tokens. Each chunk's key is a hash chained over all
 * earlier chunks, the engine's namespace (model name, element size, heads, head size, layer count,
 * kv_count, world size, worker id) and the caller's extra key bytes (cache salt, LoRA id,
 * multimodal hashes, tags: any bytes, used at full width). Keys are seed-free: identical across
 * processes, machines and restarts. A request with a different extra key never hits.
 *
 * Every operation takes one lmc_request. Its destination (where each token's KV lives in the
 * registered layers) is either
 *  - LMC_DESTINATION_SLOTS: slot_mapping, one int64 per token, slot = block * block_size + offset,
 *    -1 = "no slot for this token"; or
 *  - LMC_DESTINATION_BLOCK_TABLE: block_ids, the request's blocks in order; token t lives in block
 *    block_ids[t / table_block_size] at offset t % table_block_size, i.e. in slot
 *    block_ids[t / table_block_size] * table_block_size + t % table_block_size. A block id of -1,
 *    and tokens past the last block, have no slot (like -1 in a slot mapping). The library expands
 *    the table itself: callers never build a per-token array.
 * Any other negative slot or block id, or a slot >= num_blocks * block_size of the registered
 * layers, fails the whole call before anything is copied.
 *
 * Synchronous or not: with job_out == NULL the call returns when the operation is complete and
 * fills *result_out. With job_out != NULL it copies what it needs from the request (the caller's
 * buffers may be reused at once), returns LMC_OK at once with a job, and runs the operation in the
 * background: on the engine's own worker threads for host layers, on `stream` for CUDA layers
 * (lookups and reads from lower tiers on the worker, the copy on the stream). result_out is then
 * not written (it may be NULL); lmc_job_wait / lmc_job_result give the same lmc_transfer_result
 * the synchronous call would have. Argument errors are reported by the call itself in both modes;
 * failures of the work (LMC_E_CUDA, LMC_E_IO) by the job.
 *
 * These calls need registered layers (else LMC_E_INVALID_ARGUMENT).
 */

/** Opaque handle of an operation running in the background. Like engines, destroyed job handles
 *  are never reused and report LMC_E_INVALID_HANDLE. */
typedef struct lmc_job lmc_job;

typedef int32_t lmc_destination_kind;
#define LMC_DESTINATION_SLOTS 0       /* slot_mapping: one int64 per token */
#define LMC_DESTINATION_BLOCK_TABLE 1 /* block_ids + table_block_size */

/** One request: the tokens, their extra key, where their KV lives, and (for CUDA layers) a stream. */
typedef struct lmc_request {
  uint32_t struct_size;                  /* sizeof(lmc_request) */
  lmc_destination_kind destination_kind; /* LMC_DESTINATION_SLOTS or LMC_DESTINATION_BLOCK_TABLE */
  const int32_t *tokens;                 /* num_tokens token ids; NULL only when num_tokens == 0 */
  int64_t num_tokens;
  const uint8_t *extra_key;              /* extra_key_len bytes (at most 1 MiB); NULL when 0 */
  int64_t extra_key_len;
  /* store: skip_leading_tokens (rounded down to a chunk boundary: chunks before it are not stored);
   * retrieve: first_token_to_write (slots of earlier tokens are never written);
   * lookup and prefetch: must be 0. In [0, num_tokens]. */
  int64_t first_token;
  const int64_t *slot_mapping;           /* LMC_DESTINATION_SLOTS: num_tokens slots */
  const int32_t *block_ids;              /* LMC_DESTINATION_BLOCK_TABLE: num_block_ids ids */
  int64_t num_block_ids;
  int32_t table_block_size;              /* LMC_DESTINATION_BLOCK_TABLE: tokens per block (>= 1) */
  int32_t reserved;                      /* must be 0 */
  void *stream;                          /* CUDA layers: CUstream of their device; NULL = the
                                            library's own stream. Ignored for host layers. */
} lmc_request;

/** Entries of the per-tier arrays below: [0] is the CPU tier, [i] for i >= 1 the lower tier i - 1
 *  in lookup order (the index lmc_engine_get_tier_stats takes, plus one). */
#define LMC_MAX_TIERS 4

/** What a store, retrieve or prefetch did. Written by the synchronous call or by the job. */
typedef struct lmc_transfer_result {
  uint32_t struct_size;   /* sizeof(lmc_transfer_result), set by the caller */
  uint32_t reserved;
  /* store: tokens from the rounded-down skip point whose chunks are in the cache afterwards (stored
   *        now or already there); it stops at a chunk with a -1 slot and where room ran out.
   * retrieve: length of the cached prefix found (0 on a miss); its slots from first_token on are
   *        written. prefetch: leading tokens now in the CPU tier. */
  int64_t tokens_matched;
  int64_t tokens_copied;  /* tokens whose KV was copied: into the cache (store), into the layers (retrieve) */
  int64_t bytes_copied;   /* bytes of KV copied between the layers and the cache */
  int64_t chunks_skipped_for_space; /* store: chunks not stored because nothing could be evicted */
  /* retrieve, prefetch: chunks of the prefix served by each tier. store: [0] = chunks that were
   * already cached (not copied again). */
  int64_t chunks_by_tier[LMC_MAX_TIERS];
  int64_t elapsed_ns;     /* from the call to completion (the device's, for CUDA layers) */
} lmc_transfer_result;

/** What a lookup found. */
typedef struct lmc_lookup_result {
  uint32_t struct_size;   /* sizeof(lmc_lookup_result), set by the caller */
  uint32_t reserved;
  int64_t hit_tokens;     /* leading tokens cached in some tier: a multiple of chunk_size, or
                             num_tokens when save_unfull_chunk stored the trailing partial chunk */
  int64_t tokens_by_tier[LMC_MAX_TIERS]; /* how many of hit_tokens each tier holds (they add up) */
  int64_t elapsed_ns;
} lmc_lookup_result;

/**
 * How much of request->tokens is cached, and where. Reads no KV; request->first_token must be 0 and
 * the destination is ignored (it may be empty). Lower tiers are asked only for what the CPU tier
 * lacks.
 *
 * @return LMC_OK, LMC_E_INVALID_HANDLE, LMC_E_INVALID_ARGUMENT.
 */
LMC_API lmc_status lmc_lookup(lmc_lookup_result *result_out, lmc_engine *engine,
                              const lmc_request *request);

/**
 * Copies the KV of tokens [first_token rounded down to a chunk multiple, num_tokens) from the
 * registered layers into the cache. Full chunks are stored; the trailing partial chunk only when
 * save_unfull_chunk is true. Chunks already cached are not copied again. A chunk containing a token
 * without a slot is not stored, nor is anything after it.
 *
 * Room is made by evicting least recently used chunks of earlier requests. A store never evicts a
 * chunk of its own request (that would cut the prefix it is building), nor a chunk being read:
 * when nothing else can be evicted it stops early instead of waiting, and tokens_matched says how
 * far it got. Lookups, stores and retrieves mark a request's chunks used from the last to the first,
 * so under pressure a cached prompt loses its tail before its head (which more prompts share).
 * Stored chunks become visible to lookups when the copy is complete (when the job finishes); they
 * are written to the lower tiers in the background after that.
 *
 * The slots read must not be overwritten until the call returns or the job has finished.
 *
 * @param[out] result_out  the result (synchronous call); may be NULL when job_out is not NULL.
 * @param[out] job_out     NULL: wait for the store. Otherwise receives a job (lmc_job_destroy it).
 * @return LMC_OK, LMC_E_INVALID_HANDLE, LMC_E_INVALID_ARGUMENT, LMC_E_CUDA (CUDA layers, synchronous).
 */
LMC_API lmc_status lmc_store(lmc_transfer_result *result_out, lmc_engine *engine,
                             const lmc_request *request, lmc_job **job_out);

/**
 * Finds the longest cached prefix of request->tokens (reading chunks from lower tiers into the CPU
 * tier as needed) and writes its KV into the registered layers. Only the slots of tokens in
 * [first_token, prefix length) are written, and only those that have a slot: slots of earlier
 * tokens belong to the engine's own prefix cache and are never touched.
 *
 * The slots written must not be read until the call returns or the job has finished (for CUDA
 * layers: work enqueued on `stream` after the job's copy sees the KV without waiting).
 *
 * @param[out] result_out  the result (synchronous call); may be NULL when job_out is not NULL.
 * @param[out] job_out     NULL: wait for the retrieve. Otherwise receives a job (lmc_job_destroy it).
 * @return LMC_OK, LMC_E_INVALID_HANDLE, LMC_E_INVALID_ARGUMENT, LMC_E_CUDA (CUDA layers, synchronous).
 */
LMC_API lmc_status lmc_retrieve(lmc_transfer_result *result_out, lmc_engine *engine,
                                const lmc_request *request, lmc_job **job_out);

/* ---------------------------------------------------------------------------------------------- */
/* Lookups across processes                                                                        */
/* ---------------------------------------------------------------------------------------------- */
/*
 * vLLM asks "how much of this prompt is cached?" in its scheduler process, while the engines live
 * in the worker processes. A worker's engine serves lookups on a Unix-domain socket; the scheduler
 * asks each worker (tensor parallel: every rank) and takes the minimum. Both sides must use the same
 * tokens and extra key bytes as the later retrieve.
 *
 * Trust: both ends check the other's credentials (SO_PEERCRED) and talk only to a process of the
 * same user or root; the server's socket file is mode 0600. Put sockets in a directory only you can
 * write (mode 0700, e.g. $XDG_RUNTIME_DIR). A request holds at most 1 Mi tokens and a 1 MiB extra
 * key, and must arrive whole within 2 s of connecting; the server keeps at most 64 connections
 * (a new one displaces the longest-idle), runs on its own threads and never delays the engine's
 * jobs.
 */

/** Serves lmc_lookup for this engine on a Unix-domain socket at socket_path (UTF-8, 1 to 107
 *  bytes). A socket nobody listens on (left by a dead process) is replaced; anything else at the
 *  path (a regular file, a directory, a link, a live socket) is refused and left in place. Stopped
 *  by lmc_lookup_server_stop or lmc_engine_destroy.
 *  @return LMC_OK, LMC_E_INVALID_HANDLE, LMC_E_INVALID_ARGUMENT (bad path, path in use or not a
 *          socket, already serving), LMC_E_IO (cannot listen). */
LMC_API lmc_status lmc_lookup_server_start(lmc_engine *engine, const char *socket_path);

/** Stops the engine's lookup server and removes its socket file; no-op when none runs.
 *  @return LMC_OK, LMC_E_INVALID_HANDLE. */
LMC_API lmc_status lmc_lookup_server_stop(lmc_engine *engine);

/**
 * Asks the engine serving on socket_path how many leading tokens it holds (lmc_lookup's answer).
 * Needs no engine in the calling process.
 *
 * @param[out] hit_tokens_out  always in [0, num_tokens] on LMC_OK.
 * @param[in] timeout_ms  bound on the whole exchange, connect to answer (1 to INT32_MAX ms; -1 =
 *                        no bound).
 * @return LMC_OK; LMC_E_TIMEOUT (no answer in time) or LMC_E_IO (no server, broken connection, a
 *         server of another user, an answer outside the protocol such as a hit outside
 *         [0, num_tokens]): callers treat both as a miss; LMC_E_INVALID_ARGUMENT; or the status the
 *         remote lookup failed with.
 */
LMC_API lmc_status lmc_remote_lookup(int64_t *hit_tokens_out, const char *socket_path,
                                     const int32_t *tokens, int64_t num_tokens,
                                     const uint8_t *extra_key, int64_t extra_key_len,
                                     int64_t timeout_ms);

/* ---------------------------------------------------------------------------------------------- */
/* Asynchronous operations                                                                         */
/* ---------------------------------------------------------------------------------------------- */


/**
 * Starts bringing the longest cached prefix of request->tokens into the CPU tier in the background:
 * chunks on disk or in the remote store are read and promoted, no KV layer is written. A retrieve
 * issued after the job finished finds them in memory. The request is copied; its destination is
 * ignored and first_token must be 0. The job's result: tokens_matched = leading tokens now in the
 * CPU tier, chunks_by_tier = where they were found.
 *
 * @param[out] job_out  receives the job; destroy it with lmc_job_destroy.
 * @return LMC_OK, LMC_E_INVALID_HANDLE, LMC_E_INVALID_ARGUMENT.
 */
LMC_API lmc_status lmc_prefetch_start(lmc_job **job_out, lmc_engine *engine,
                                      const lmc_request *request);

/**
 * Waits up to timeout_ms (0 = do not wait, -1 = forever) for a job.
 *
 * @param[out] result_out  the job's result when it finished with LMC_OK.
 * @return LMC_OK (finished), LMC_E_TIMEOUT (still running), LMC_E_INVALID_HANDLE,
 *         LMC_E_INVALID_ARGUMENT, or the status the job itself failed with (its message is then the
 *         thread's last error).
 */
LMC_API lmc_status lmc_job_wait(lmc_transfer_result *result_out, lmc_job *job, int64_t timeout_ms);

/**
 * Whether a job has finished (successfully or not), without waiting and without reading its result:
 * the cheap check for a loop that polls many jobs (vLLM's get_finished).
 *
 * @param[out] finished_out  1 when finished, 0 while running.
 * @return LMC_OK, LMC_E_INVALID_HANDLE, LMC_E_INVALID_ARGUMENT.
 */
LMC_API lmc_status lmc_job_poll(int32_t *finished_out, lmc_job *job);

/** lmc_job_wait with a timeout of 0: the result of a finished job, LMC_E_TIMEOUT while it runs. */
LMC_API lmc_status lmc_job_result(lmc_transfer_result *result_out, lmc_job *job);

/** Releases a job handle. A job still running goes on and its result is dropped; the engine still
 *  completes its bookkeeping (and destroying the engine waits for it). NULL, destroyed handles and
 *  handles that are not jobs (an engine) are a no-op; for the last two lmc_last_error_message()
 *  says why. */
LMC_API void lmc_job_destroy(lmc_job *job);

/* ---------------------------------------------------------------------------------------------- */
/* CUDA                                                                                            */
/* ---------------------------------------------------------------------------------------------- */
/*
 * With layers in GPU memory, chunk objects live in pinned, device-mapped host memory (cuMemHostAlloc,
 * bounded by max_local_cpu_size) and one kernel launch moves a whole request: every layer, K and V,
 * every token. The library uses each device's primary context (the one the CUDA runtime and torch
 * use), pushed for the duration of each call, so the caller's current context is left as it was.
 *
 * Streams: lmc_request.stream is a CUstream / cudaStream_t of that device (from Python:
 * torch.cuda.current_stream().cuda_stream), or NULL for the library's own stream (one non-blocking
 * stream per device). The library only ENQUEUES work on it (argument upload, kernel, for large
 * stores the copy out of a staging buffer, and an event); only a synchronous call (job_out == NULL)
 * then waits for that event, never for the whole stream or device. Hence:
 *  - the copy runs after all work enqueued on `stream` before the copy is enqueued (vLLM's forward
 *    pass that wrote the KV, when it is the same stream). A job enqueues its copy after its lookups
 *    and lower-tier reads, on the worker: pass the stream the KV was written on, or make sure that
 *    work is complete (vLLM's saves run after the step's forward pass has been synchronised);
 *  - work enqueued on `stream` after the copy sees the retrieved KV; other streams and host code
 *    wait for the job (lmc_job_wait) first;
 *  - a store's slots must not be overwritten, and a retrieve's slots not read, before the job has
 *    finished.
 *
 * Ownership: tokens, slot mappings, block tables and extra keys are HOST memory (copy vLLM's device
 * slot mapping to the host first). The chunks involved stay pinned in the cache until the device
 * has finished. A job completes when the device has passed the transfer, with LMC_E_CUDA when the
 * device failed (a failed store caches nothing). lmc_engine_destroy and lmc_engine_register_layers
 * wait for jobs in flight.
 *
 * Environment (read once per process): LMC_CUDA_LIBRARY names the driver library instead of
 * libcuda.so.1 (tests set it to a missing path to simulate a machine without a driver);
 * LMC_CUDA_STAGING_MIN_BYTES / LMC_CUDA_STAGING_MAX_BYTES set from which transfer size a store goes
 * through a device staging buffer instead of writing pinned memory directly ("off" = never); see
 * docs/cuda.md.
 */

/**
 * Number of CUDA devices the library can use. Loads and initialises the CUDA driver on first use.
 *
 * @return LMC_OK; LMC_E_NO_DEVICE when there is no driver (libcuda.so.1 missing), cuInit fails (a
 *         machine with the driver or toolkit but no GPU) or no device is found; the message says
 *         which. *count_out is left untouched on failure.
 */
LMC_API lmc_status lmc_cuda_device_count(int32_t *count_out);

/* ---------------------------------------------------------------------------------------------- */
/* Statistics and maintenance                                                                      */
/* ---------------------------------------------------------------------------------------------- */

/** Counters since the engine was created (cumulative) and pool gauges (current). */
typedef struct lmc_stats {
  uint32_t struct_size;               /* sizeof(lmc_stats), set by the caller */
  uint32_t reserved;                  /* 0 */
  uint64_t lookup_requests;           /* lmc_lookup calls that succeeded */
  uint64_t lookup_tokens;             /* tokens asked about by lookups */
  uint64_t lookup_hit_tokens;         /* tokens found by lookups */
  uint64_t store_requests;            /* lmc_store calls that succeeded */
  uint64_t stored_tokens;             /* tokens copied into the cache (excludes already cached) */
  uint64_t stored_bytes;              /* bytes copied into the cache */
  uint64_t retrieve_requests;         /* lmc_retrieve calls that succeeded */
  uint64_t retrieve_requested_tokens; /* tokens asked for by retrieves */
  uint64_t retrieved_tokens;          /* tokens of the retrieved prefixes */
  uint64_t retrieved_bytes;           /* bytes written into the KV layers */
  uint64_t evicted_chunks;            /* chunks evicted to make room (LRU) */
  uint64_t store_skipped_chunks;      /* chunks not stored because nothing could be evicted */
  uint64_t cached_chunks;             /* chunks in the cache now */
  uint64_t pool_used_bytes;           /* pool bytes held by cached chunks now */
  uint64_t pool_capacity_bytes;       /* pool capacity (max_local_cpu_size, whole chunks) */
} lmc_stats;

/** Fills the first stats->struct_size bytes of *stats (struct_size must be >= 8).
 *  @return LMC_OK, LMC_E_INVALID_HANDLE, LMC_E_INVALID_ARGUMENT. */
LMC_API lmc_status lmc_engine_get_stats(lmc_engine *engine, lmc_stats *stats);

/** Counters of one lower storage tier (local disk, remote), cumulative since the engine started,
 *  and its current size. */
typedef struct lmc_tier_stats {
  uint32_t struct_size;       /* sizeof(lmc_tier_stats), set by the caller */
  uint32_t reserved;          /* 0 */
  char name[32];              /* LMCache's backend name: "LocalDiskBackend", "RemoteBackend"; NUL-terminated */
  uint64_t hits;              /* chunks read from this tier */
  uint64_t misses;            /* chunks asked for and not found or not readable */
  uint64_t bytes_read;        /* payload bytes read */
  uint64_t bytes_written;     /* payload bytes written */
  uint64_t writes;            /* records written */
  uint64_t evictions;         /* records removed to make room */
  uint64_t write_queue_drops; /* writes dropped because the write-behind queue was full */
  uint64_t corrupt_records;   /* records refused for a bad header, length or checksum */
  uint64_t errors;            /* I/O or network failures, each turned into a miss or a skipped write */
  uint64_t reconnects;        /* connections restored (remote) */
  uint64_t used_bytes;        /* bytes held now (disk) */
  uint64_t capacity_bytes;    /* bound on used_bytes (max_local_disk_size); 0 when not applicable */
} lmc_tier_stats;

/** Number of lower tiers, in lookup order (disk before remote). @return LMC_OK, LMC_E_INVALID_HANDLE,
 *  LMC_E_INVALID_ARGUMENT. */
LMC_API lmc_status lmc_engine_tier_count(int32_t *count_out, lmc_engine *engine);

/** Fills the first stats->struct_size bytes (>= 8) with the counters of tier tier_index.
 *  @return LMC_OK, LMC_E_INVALID_HANDLE, LMC_E_INVALID_ARGUMENT, LMC_E_NOT_FOUND (no such tier). */
LMC_API lmc_status lmc_engine_get_tier_stats(lmc_engine *engine, int32_t tier_index,
                                             lmc_tier_stats *stats);

/* ---------------------------------------------------------------------------------------------- */
/* Metrics (Prometheus)                                                                            */
/* ---------------------------------------------------------------------------------------------- */

/**
 * Writes the engine's metrics in the Prometheus text exposition format (version 0.0.4), as a
 * NUL-terminated UTF-8 string: what an HTTP handler for /metrics returns with
 * "Content-Type: text/plain; version=0.0.4". Names, help texts, types and histogram buckets are
 * LMCache's (lmcache/observability.py): counters such as lmcache:num_hit_tokens_total, gauges such
 * as lmcache:local_cache_usage, histograms such as lmcache:time_to_retrieve (_bucket/_sum/_count);
 * then what this library counts beyond LMCache under the same "lmcache:" prefix. docs/metrics.md
 * lists every metric. Every sample is labelled model_name (as given to lmc_engine_create),
 * worker_id (its worker_id) and role ("worker"); per-tier metrics add backend ("LocalCPUBackend",
 * "LocalDiskBackend", "RemoteBackend"). Counters are cumulative since the engine was created; no
 * value is NaN (hit rates are 0 before the first request).
 *
 * Counting is done by the engine as requests complete (atomic adds, no lock on the copy path); this
 * call only reads and formats (tens of KiB), so it may be called from any thread at any time.
 *
 * Same size-query protocol as lmc_engine_get_config:
 * @param[out] needed_out  receives the size in bytes including the NUL, also on BUFFER_TOO_SMALL.
 *                         The text grows as values grow: size the buffer with some room, and retry
 *                         on LMC_E_BUFFER_TOO_SMALL.
 * @param[out] buffer      destination; may be NULL when capacity is 0 (to ask for the size).
 * @return LMC_OK, LMC_E_INVALID_HANDLE, LMC_E_INVALID_ARGUMENT, LMC_E_BUFFER_TOO_SMALL.
 */
LMC_API lmc_status lmc_engine_get_metrics(int64_t *needed_out, lmc_engine *engine, char *buffer,
                                          int64_t capacity);

/**
 * Per-node counters of lower tier tier_index, as a NUL-terminated UTF-8 JSON array with one object
 * per node the tier has talked to or knows of (a remote tier's servers: the standalone server, every
 * cluster master and replica, the primary found through Sentinel; "(tier)" holds failures not tied to
 * one node, such as no connection at all). Local tiers give []. Fields, cumulative since the engine
 * started: "endpoint" ("host:port"), "role" ("master", "replica", "sentinel" or "unknown"),
 * "connected" (now), "bytes_read" and "bytes_written" (payload bytes), "errors" (failed operations
 * and connection failures), "reconnects" (connections restored), "redirects" (slot moves the node
 * answered with MOVED), "last_error" (the newest failure message, credentials redacted, or null).
 * A text form rather than a struct so that nodes can be added without an ABI change.
 * Same size-query protocol as lmc_engine_get_config.
 *
 * @param[out] needed_out  receives the size in bytes including the NUL, also on BUFFER_TOO_SMALL.
 * @param[out] buffer      destination; may be NULL when capacity is 0 (to ask for the size).
 * @return LMC_OK, LMC_E_INVALID_HANDLE, LMC_E_INVALID_ARGUMENT, LMC_E_NOT_FOUND (no such tier),
 *         LMC_E_BUFFER_TOO_SMALL.
 */
LMC_API lmc_status lmc_engine_get_tier_nodes(int64_t *needed_out, lmc_engine *engine, int32_t tier_index,
                                             char *buffer, int64_t capacity);

/** Waits up to timeout_ms (0 to INT32_MAX ms; -1 = forever) until the lower tiers have written
 *  everything stored so far (stores write them in the background).
 *  @return LMC_OK, LMC_E_TIMEOUT, LMC_E_INVALID_HANDLE, LMC_E_INVALID_ARGUMENT. */
LMC_API lmc_status lmc_engine_flush(lmc_engine *engine, int64_t timeout_ms);

/** Removes every chunk of the CPU tier that is not being read right now and returns their memory to
 *  the pool. Lower tiers keep their records (other engines may share them). Counters are kept.
 *  @return LMC_OK, LMC_E_INVALID_HANDLE. */
LMC_API lmc_status lmc_engine_clear(lmc_engine *engine);

/* ---------------------------------------------------------------------------------------------- */
/* KV events for routers (enable_kv_events)                                                        */
/* ---------------------------------------------------------------------------------------------- */

/*
 * With the config key "enable_kv_events": true, the engine queues one event each time a chunk
 * becomes available in a tier or its last copy leaves it, so that a KV-aware router knows which
 * prefixes this engine can serve from cache. With it false (the default) nothing is queued and
 * every poll returns 0 events.
 *
 *  - BLOCK_STORED: a chunk is now in `medium`: CPU when a store publishes it or a retrieve or
 *    prefetch promotes it from disk or remote; DISK when its record is written (write-behind);
 *    REMOTE when the remote write succeeded. Carries the token ids and the parent's hash. A write
 *    that finds the record already there reports it too, so a chunk may be announced again:
 *    treat BLOCK_STORED as idempotent.
 *  - BLOCK_REMOVED: the chunk left `medium`: CPU eviction (LRU); a disk record evicted or found
 *    corrupt. Only for chunks the engine announced before. A remote store's expiry (TTL) and
 *    other clients' deletions cannot be seen without polling the store: REMOTE chunks are never
 *    reported removed.
 *  - ALL_BLOCKS_CLEARED (medium CPU): every chunk of the CPU tier was dropped at once
 *    (lmc_engine_clear, or layers registered with another key namespace). Lower tiers keep theirs.
 * A CPU pool used only for staging (local_cpu false) reports no CPU events.
 *
 * Hashes: block_hash names a chunk; it is the chunk key of the engine (32 bytes for sha256, 16
 * for xxh3_128, see pre_caching_hash_algorithm) as a single-rank engine computes it, so every
 * tensor-parallel rank names the same chunk alike (with world_size 1 it is exactly the engine's
 * key). parent_hash is the previous chunk's (none for a prefix's first chunk): chunks form a chain
 * over the prompt, as vLLM's blocks do. token_count is the chunk's length (chunk_size, fewer for a
 * trailing partial chunk).
 *
 * Order: events of one chunk in one medium are queued in the order they happened. The queue holds
 * kv_events_queue_size events; when it is full, NEW events are dropped and counted, and the next
 * poll reports the count in dropped_out: the consumer's view is then incomplete and it should
 * resynchronise (forget what it knew, as after ALL_BLOCKS_CLEARED). Producing an event never
 * blocks a store or retrieve.
 */
#define LMC_KV_EVENT_BLOCK_STORED 1
#define LMC_KV_EVENT_BLOCK_REMOVED 2
#define LMC_KV_EVENT_ALL_BLOCKS_CLEARED 3

#define LMC_KV_MEDIUM_CPU 1    /* vLLM medium "CPU" */
#define LMC_KV_MEDIUM_DISK 2   /* "DISK" */
#define LMC_KV_MEDIUM_REMOTE 3 /* "REMOTE" */

#define LMC_KV_HASH_MAX_BYTES 32

/** One KV event (104 bytes), written by lmc_engine_poll_events. */
typedef struct lmc_kv_event {
  uint32_t struct_size;     /* bytes of this element the library wrote: min(event_size, its own) */
  uint32_t kind;            /* LMC_KV_EVENT_* */
  uint32_t medium;          /* LMC_KV_MEDIUM_* */
  uint32_t hash_len;        /* bytes of block_hash in use (32 sha256, 16 xxh3_128); 0 for ALL_BLOCKS_CLEARED */
  uint8_t block_hash[LMC_KV_HASH_MAX_BYTES];  /* the chunk's hash; bytes past hash_len are 0 */
  uint8_t parent_hash[LMC_KV_HASH_MAX_BYTES]; /* the previous chunk's hash; bytes past parent_hash_len are 0 */
  uint32_t parent_hash_len; /* 0: the chunk starts its prefix, or a kind that carries no parent (REMOVED, CLEARED) */
  uint32_t token_count;     /* tokens in the chunk; 0 for ALL_BLOCKS_CLEARED */
  int64_t token_ids_offset; /* BLOCK_STORED: index of its first token id in the poll's token_ids */
  int64_t token_ids_count;  /* BLOCK_STORED: token_count; 0 for the other kinds */
} lmc_kv_event;

/**
 * Moves the oldest queued events, in order, into events[0 .. *num_events_out) and their token ids
 * into token_ids[0 .. *num_token_ids_out); never waits. Stops at `capacity` events (at most 4096
 * per call; poll again while a call returns as many as it could take), or before an
 * event whose token ids would not fit in what is left of token_capacity (it stays queued, first in
 * line). Nothing is owned across calls: the caller owns both arrays, the library keeps no pointer.
 * Any thread; concurrent polls each get different events.
 *
 * @param[out] num_events_out     events written (0 when none are queued or events are off)
 * @param[out] num_token_ids_out  token ids written, over all events
 * @param[out] dropped_out        events dropped because the queue was full since the previous
 *                                poll (reported once); nonzero means: resynchronise
 * @param[out] events             capacity elements of event_size bytes; NULL only if capacity is 0
 * @param event_size              sizeof(lmc_kv_event) as the caller compiled it (>= 104): the stride
 * @param[out] token_ids          token_capacity int32; NULL only if token_capacity is 0. A buffer
 *                                of capacity * chunk_size never stops a poll early.
 * @return LMC_OK; LMC_E_INVALID_HANDLE; LMC_E_INVALID_ARGUMENT (NULL out-parameter, NULL array
 *         with a nonzero size, negative sizes, event_size < 104); LMC_E_BUFFER_TOO_SMALL when
 *         capacity > 0 but token_capacity cannot hold the next event's token ids (nothing is
 *         taken from the queue; the message says how many it needs).
 */
LMC_API lmc_status lmc_engine_poll_events(int64_t *num_events_out, int64_t *num_token_ids_out,
                                          uint64_t *dropped_out, lmc_engine *engine,
                                          lmc_kv_event *events, uint32_t event_size,
                                          int64_t capacity, int32_t *token_ids,
                                          int64_t token_capacity);

LMC_END_DECL

#endif /* LMCACHE_NATIVE_H */
