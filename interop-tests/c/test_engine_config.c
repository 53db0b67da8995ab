/*
 * test_engine_config.c — engine create / destroy, lmc_engine_get_config, lmc_config_schema,
 * destroyed and foreign engine handles.
 *
 * `test_engine_config --probe foreign-handle` is run as a child process: handing the library a
 * pointer it never returned may crash a broken implementation, and a crash must cost one check.
 */
#include "harness.h"

#include <ctype.h>

/* ---------------------------------------------------------------------------------------------- */
/* A small JSON syntax checker: enough to say "this is valid JSON" and to find the top level's     */
/* array elements (their spans) or object keys.                                                    */
/* ---------------------------------------------------------------------------------------------- */

enum { JSON_MAX_TOP = 256 };

typedef struct json_info {
  int top_count;                    /* elements of the top-level array / members of the object */
  const char *top_start[JSON_MAX_TOP]; /* array: where each element starts */
  const char *top_end[JSON_MAX_TOP];   /* array: one past its end */
  char top_key[JSON_MAX_TOP][64];      /* object: each member's key (truncated) */
} json_info;

static void json_ws(const char **p) {
  while (**p == ' ' || **p == '\t' || **p == '\n' || **p == '\r') (*p)++;
}

static int json_string(const char **p, char *out, size_t out_len) {
  size_t n = 0;
  if (**p != '"') return 0;
  (*p)++;
  while (**p != '"') {
    unsigned char c = (unsigned char)**p;
    if (c == '\0' || c < 0x20) return 0;
    if (c == '\\') {
      (*p)++;
      if (**p == 'u') {
        int i;
        for (i = 1; i <= 4; i++)
          if (!isxdigit((unsigned char)(*p)[i])) return 0;
        (*p) += 4;
      } else if (!strchr("\"\\/bfnrt", **p) || **p == '\0') {
        return 0;
      }
    }
    if (out && n + 1 < out_len) out[n++] = (char)**p;
    (*p)++;
  }
  if (out) out[n] = '\0';
  (*p)++;
  return 1;
}

static int json_value(const char **p, int depth, json_info *info);

static int json_number(const char **p) {
  const char *s = *p;
  if (**p == '-') (*p)++;
  if (**p == '0')
    (*p)++;
  else if (isdigit((unsigned char)**p))
    while (isdigit((unsigned char)**p)) (*p)++;
  else
    return 0;
  if (**p == '.') {
    (*p)++;
    if (!isdigit((unsigned char)**p)) return 0;
    while (isdigit((unsigned char)**p)) (*p)++;
  }
  if (**p == 'e' || **p == 'E') {
    (*p)++;
    if (**p == '+' || **p == '-') (*p)++;
    if (!isdigit((unsigned char)**p)) return 0;
    while (isdigit((unsigned char)**p)) (*p)++;
  }
  return *p > s;
}

static int json_value(const char **p, int depth, json_info *info) {
  if (depth > 64) return 0;
  json_ws(p);
  if (**p == '{') {
    (*p)++;
    json_ws(p);
    if (**p == '}') {
      (*p)++;
      return 1;
    }
    for (;;) {
      char key[64];
      json_ws(p);
      if (!json_string(p, key, sizeof key)) return 0;
      if (depth == 0 && info && info->top_count < JSON_MAX_TOP)
        snprintf(info->top_key[info->top_count++], sizeof info->top_key[0], "%s", key);
      json_ws(p);
      if (**p != ':') return 0;
      (*p)++;
      if (!json_value(p, depth + 1, info)) return 0;
      json_ws(p);
      if (**p == ',') {
        (*p)++;
        continue;
      }
      if (**p != '}') return 0;
      (*p)++;
      return 1;
    }
  }
  if (**p == '[') {
    (*p)++;
    json_ws(p);
    if (**p == ']') {
      (*p)++;
      return 1;
    }
    for (;;) {
      const char *start;
      json_ws(p);
      start = *p;
      if (!json_value(p, depth + 1, info)) return 0;
      if (depth == 0 && info && info->top_count < JSON_MAX_TOP) {
        info->top_start[info->top_count] = start;
        info->top_end[info->top_count++] = *p;
      }
      json_ws(p);
      if (**p == ',') {
        (*p)++;
        continue;
      }
      if (**p != ']') return 0;
      (*p)++;
      return 1;
    }
  }
  if (**p == '"') return json_string(p, NULL, 0);
  if (strncmp(*p, "true", 4) == 0) return (*p += 4), 1;
  if (strncmp(*p, "false", 5) == 0) return (*p += 5), 1;
  if (strncmp(*p, "null", 4) == 0) return (*p += 4), 1;
  return json_number(p);
}

/* 1 when text is exactly one JSON value (surrounding whitespace allowed). */
static int json_valid(const char *text, json_info *info) {
  const char *p = text;
  if (info) memset(info, 0, sizeof *info);
  if (!json_value(&p, 0, info)) return 0;
  json_ws(&p);
  return *p == '\0';
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
  create_case("{\"chunk_size\": 8, \"chunk_size\": 16}", "m", 1, 0, LMC_E_INVALID_ARGUMENT,
              "chunk_size", "repeated key chunk_size");
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
  create_case("{}", "\xe6\xa8\xa1\xe5\x9e\x8b-\xc3\xbc", 1, 0, LMC_OK, NULL, "UTF-8 model_name");
  create_case("{}", "bad-\xff\xfe-utf8", 1, 0, LMC_E_INVALID_ARGUMENT, NULL,
              "model_name with invalid UTF-8");
  create_case("{}", "m", 0, 0, LMC_E_INVALID_ARGUMENT, NULL, "world_size 0");
  create_case("{}", "m", -1, 0, LMC_E_INVALID_ARGUMENT, NULL, "world_size -1");
  create_case("{}", "m", 2, -1, LMC_E_INVALID_ARGUMENT, NULL, "worker_id -1");
  create_case("{}", "m", 2, 2, LMC_E_INVALID_ARGUMENT, NULL, "worker_id 2 of world_size 2");
  create_case("{}", "m", 4, 3, LMC_OK, NULL, "worker_id 3 of world_size 4");

  lmc_engine_destroy(NULL);
  report(1, "lmc_engine_destroy(NULL) is a no-op");
}

/* ---------------------------------------------------------------------------------------------- */
/* The size-query protocol shared by lmc_engine_get_config and lmc_config_schema                   */
/* ---------------------------------------------------------------------------------------------- */

typedef lmc_status (*text_fn)(int64_t *needed_out, void *ctx, char *buffer, int64_t capacity);

static lmc_status config_fn(int64_t *needed_out, void *ctx, char *buffer, int64_t capacity) {
  return lmc_engine_get_config(needed_out, (lmc_engine *)ctx, buffer, capacity);
}

static lmc_status schema_fn(int64_t *needed_out, void *ctx, char *buffer, int64_t capacity) {
  (void)ctx;
  return lmc_config_schema(needed_out, buffer, capacity);
}

/* Runs the protocol's checks and returns the text (malloc'd) or NULL. */
static char *size_query_protocol(text_fn fn, void *ctx, const char *name, const char *what) {
  int64_t needed = SENTINEL_I64, n = SENTINEL_I64;
  char *buf, *text = NULL;
  lmc_status s = fn(&needed, ctx, NULL, 0);
  EXPECT(s, LMC_E_BUFFER_TOO_SMALL, "%s(buffer NULL, capacity 0) [%s]", name, what);
  report(needed > 2 && needed < (1 << 22), "size query %s [%s] reports needed = %lld bytes", name,
         what, (long long)needed);
  if (!(needed > 2 && needed < (1 << 22))) return NULL;

  buf = (char *)malloc((size_t)needed + 64);
  if (!buf) exit(2);
  memset(buf, 'X', (size_t)needed + 64);
  s = fn(&n, ctx, buf, -1);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "%s(capacity -1) [%s]", name, what);

  n = SENTINEL_I64;
  s = fn(&n, ctx, NULL, 16);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "%s(buffer NULL, capacity 16) [%s]", name, what);
  report(n == SENTINEL_I64, "%s(buffer NULL, capacity 16) [%s] leaves needed_out untouched (%lld)",
         name, what, (long long)n);

  n = SENTINEL_I64;
  s = fn(&n, ctx, buf, needed - 1);
  EXPECT(s, LMC_E_BUFFER_TOO_SMALL, "%s(capacity needed-1) [%s]", name, what);
  {
    int untouched = 1;
    int64_t i;
    for (i = 0; i < needed + 64; i++)
      if (buf[i] != 'X') untouched = 0;
    report(n == needed && untouched,
           "%s(capacity needed-1) [%s] reports needed %lld (want %lld), buffer untouched: %s", name,
           what, (long long)n, (long long)needed, untouched ? "yes" : "no");
  }

  n = SENTINEL_I64;
  s = fn(&n, ctx, buf, needed);
  EXPECT(s, LMC_OK, "%s(capacity needed) [%s]", name, what);
  if (s == LMC_OK) {
    size_t len = strnlen(buf, (size_t)needed);
    report(n == needed && (int64_t)len + 1 == needed && buf[needed] == 'X',
           "%s [%s] writes %lld bytes including the NUL (needed_out %lld), nothing past them", name,
           what, (long long)len + 1, (long long)n);
    if ((int64_t)len + 1 == needed) {
      text = (char *)malloc((size_t)needed);
      if (!text) exit(2);
      memcpy(text, buf, (size_t)needed);
    }
  }
  n = SENTINEL_I64;
  memset(buf, 'X', (size_t)needed + 64);
  s = fn(&n, ctx, buf, needed + 64);
  EXPECT(s, LMC_OK, "%s(capacity needed+64) [%s]", name, what);
  report(s == LMC_OK && n == needed && text != NULL && strcmp(buf, text) == 0,
         "%s(capacity needed+64) [%s] writes the same %lld bytes", name, what, (long long)n);
  free(buf);
  return text;
}

/* ---------------------------------------------------------------------------------------------- */
/* get_config                                                                                      */
/* ---------------------------------------------------------------------------------------------- */

static void check_config_text(lmc_engine *e, long long want_chunk, const char *what) {
  long long v = -1;
  char *text = size_query_protocol(config_fn, e, "lmc_engine_get_config", what);
  json_info info;
  if (!text) return;
  report(json_valid(text, &info) && text[strspn(text, " \t\r\n")] == '{',
         "get_config [%s] is a valid JSON object: %.160s", what, text);
  report(json_int(text, "chunk_size", &v) && v == want_chunk,
         "get_config [%s] has \"chunk_size\": %lld (want %lld)", what, v, want_chunk);
  report(strstr(text, "\"max_local_cpu_size\"") && strstr(text, "\"save_unfull_chunk\"") &&
             strstr(text, "\"local_cpu\"") && strstr(text, "\"pre_caching_hash_algorithm\""),
         "get_config [%s] lists local_cpu, max_local_cpu_size, save_unfull_chunk, "
         "pre_caching_hash_algorithm",
         what);
  free(text);
}

static void test_get_config(void) {
  lmc_engine *e = create_engine(NULL, "get_config");
  lmc_engine *e8 = create_engine("{\"chunk_size\": 8}", "get_config");
  lmc_engine *es = create_engine("{\"remote_url\": \"redis://user:hunter2@127.0.0.1:1/0\"}",
                                 "get_config with a password in remote_url");
  int64_t needed = SENTINEL_I64;
  lmc_status s;

  s = lmc_engine_get_config(NULL, e, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_engine_get_config(needed_out NULL)");
  s = lmc_engine_get_config(&needed, NULL, NULL, 0);
  EXPECT(s, LMC_E_INVALID_HANDLE, "lmc_engine_get_config(engine NULL)");
  report(needed == SENTINEL_I64, "get_config(engine NULL) leaves needed_out untouched");
  if (e) check_config_text(e, 256, "config NULL, default chunk_size");
  if (e8) check_config_text(e8, 8, "chunk_size 8");
  if (es) {
    char buf[8192];
    s = lmc_engine_get_config(&needed, es, buf, sizeof buf);
    EXPECT(s, LMC_OK, "lmc_engine_get_config with a remote_url holding a password");
    report(s == LMC_OK && strstr(buf, "hunter2") == NULL && strstr(buf, "***") != NULL,
           "get_config redacts the URL's password (\"hunter2\" absent, \"***\" present)");
  }
  lmc_engine_destroy(e);
  lmc_engine_destroy(e8);
  lmc_engine_destroy(es);
}

/* ---------------------------------------------------------------------------------------------- */
/* lmc_config_schema                                                                               */
/* ---------------------------------------------------------------------------------------------- */

/* The array element of the schema whose "name" is `key`, or -1. */
static int schema_entry(const char *text, const json_info *info, const char *key) {
  char pattern[96];
  int i;
  (void)text;
  for (i = 0; i < info->top_count; i++) {
    const char *p = info->top_start[i];
    size_t len = (size_t)(info->top_end[i] - p);
    char *obj = (char *)malloc(len + 1);
    json_info inner;
    int j, found = 0;
    if (!obj) exit(2);
    memcpy(obj, p, len);
    obj[len] = '\0';
    if (json_valid(obj, &inner))
      for (j = 0; j < inner.top_count; j++)
        if (strcmp(inner.top_key[j], "name") == 0) {
          const char *q = strstr(obj, "\"name\"");
          snprintf(pattern, sizeof pattern, "\"%s\"", key);
          if (q) {
            q += 6;
            q += strspn(q, " \t\r\n:");
            found = strncmp(q, pattern, strlen(pattern)) == 0;
          }
        }
    free(obj);
    if (found) return i;
  }
  return -1;
}

static int entry_has(const json_info *info, int i, const char *needle) {
  const char *p = info->top_start[i];
  size_t len = (size_t)(info->top_end[i] - p), n = strlen(needle), k;
  for (k = 0; k + n <= len; k++)
    if (strncmp(p + k, needle, n) == 0) return 1;
  return 0;
}

static void test_config_schema(void) {
  static const char *const keys[] = {"chunk_size", "local_cpu", "max_local_cpu_size",
                                     "save_unfull_chunk", "pre_caching_hash_algorithm",
                                     "local_disk", "max_local_disk_size", "remote_url",
                                     "extra_config"};
  int64_t needed = SENTINEL_I64;
  json_info info;
  char *text, *again;
  size_t i;
  int valid, all_objects = 1, all_named = 1;
  lmc_status s;

  s = lmc_config_schema(NULL, NULL, 0);
  EXPECT(s, LMC_E_INVALID_ARGUMENT, "lmc_config_schema(needed_out NULL)");
  text = size_query_protocol(schema_fn, NULL, "lmc_config_schema", "no engine");
  if (!text) return;
  valid = json_valid(text, &info);
  report(valid && text[strspn(text, " \t\r\n")] == '[' && info.top_count >= 5,
         "lmc_config_schema is a valid JSON array of %d entries: %.120s…", info.top_count, text);
  if (!valid) {
    free(text);
    return;
  }
  for (i = 0; i < (size_t)info.top_count; i++) {
    if (*info.top_start[i] != '{') all_objects = 0;
    if (!entry_has(&info, (int)i, "\"name\"") || !entry_has(&info, (int)i, "\"type\"") ||
        !entry_has(&info, (int)i, "\"default\"") || !entry_has(&info, (int)i, "\"nullable\"") ||
        !entry_has(&info, (int)i, "\"description\""))
      all_named = 0;
  }
  report(all_objects && all_named,
         "every schema entry is an object with \"name\", \"type\", \"default\", \"nullable\", "
         "\"description\"");
  for (i = 0; i < sizeof keys / sizeof keys[0]; i++) {
    int k = schema_entry(text, &info, keys[i]);
    report(k >= 0, "lmc_config_schema has an entry named \"%s\"%s", keys[i],
           k >= 0 ? "" : " (missing)");
  }
  {
    int k = schema_entry(text, &info, "chunk_size");
    if (k >= 0) {
      char obj[4096];
      long long def = -1;
      size_t len = (size_t)(info.top_end[k] - info.top_start[k]);
      snprintf(obj, sizeof obj, "%.*s", (int)(len < sizeof obj ? len : sizeof obj - 1),
               info.top_start[k]);
      report(strstr(obj, "\"integer\"") != NULL && json_int(obj, "default", &def) && def == 256,
             "schema entry chunk_size: type \"integer\", default %lld (want 256): %.200s", def, obj);
    }
    k = schema_entry(text, &info, "pre_caching_hash_algorithm");
    if (k >= 0)
      report(entry_has(&info, k, "\"choices\"") && entry_has(&info, k, "\"sha256\"") &&
                 entry_has(&info, k, "\"xxh3_128\""),
             "schema entry pre_caching_hash_algorithm lists its choices (sha256, xxh3_128)");
  }

  /* Every key the engine's resolved configuration shows is one the schema describes. */
  {
    lmc_engine *e = create_engine(NULL, "schema vs get_config");
    char cfg[16384];
    json_info ci;
    int k, missing = 0;
    char first_missing[64] = "";
    if (e && lmc_engine_get_config(&needed, e, cfg, sizeof cfg) == LMC_OK && json_valid(cfg, &ci)) {
      for (k = 0; k < ci.top_count; k++)
        if (schema_entry(text, &info, ci.top_key[k]) < 0) {
          if (!missing) snprintf(first_missing, sizeof first_missing, "%s", ci.top_key[k]);
          missing++;
        }
      report(missing == 0 && ci.top_count > 0,
             "all %d keys of get_config's object are in the schema (%d missing%s%s)", ci.top_count,
             missing, missing ? ", first: " : "", first_missing);
    } else {
      report(0, "get_config for the schema comparison");
    }
    lmc_engine_destroy(e);
  }

  again = (char *)malloc(strlen(text) + 1);
  if (!again) exit(2);
  s = lmc_config_schema(&needed, again, (int64_t)strlen(text) + 1);
  report(s == LMC_OK && strcmp(again, text) == 0, "lmc_config_schema returns the same text twice");
  free(again);
  free(text);
}

/* ---------------------------------------------------------------------------------------------- */
/* Destroyed and foreign engine handles                                                            */
/* ---------------------------------------------------------------------------------------------- */

static void test_destroyed_handle(void) {
  lmc_engine *e = create_engine("{\"chunk_size\": 8, \"max_local_cpu_size\": 0.01}", "destroy");
  lmc_engine *later[4];
  kvbuf src;
  lmc_kv_layer_desc descs[2];
  int32_t tok[NTOK];
  int64_t slots[NTOK], needed = SENTINEL_I64;
  int32_t blocks[NB];
  lmc_transfer_result r = tr_blank();
  lmc_lookup_result lr = lr_blank();
  lmc_request q, qt;
  lmc_job *job = SENTINEL_JOB;
  char buf[64];
  lmc_stats st;
  lmc_status s;
  int i, reused = 0;
  if (!e) return;
  kv_alloc(&src);
  kv_pattern(&src, 11);
  make_tokens(tok, NTOK, 6);
  make_slots(slots, NTOK, 5, 3);
  for (i = 0; i < NB; i++) blocks[i] = i;
  q = req_slots(tok, NTOK, slots, 0, NULL);
  qt = req_table(tok, NTOK, blocks, NB, BS, 0, NULL);
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
  s = lmc_lookup(&lr, e, &q);
  EXPECT(s, LMC_E_INVALID_HANDLE, "destroyed handle: lmc_lookup");
  s = lmc_store(&r, e, &q, NULL);
  EXPECT(s, LMC_E_INVALID_HANDLE, "destroyed handle: lmc_store (synchronous)");
  s = lmc_store(&r, e, &qt, &job);
  EXPECT(s, LMC_E_INVALID_HANDLE, "destroyed handle: lmc_store (job, block table)");
  s = lmc_retrieve(&r, e, &q, NULL);
  EXPECT(s, LMC_E_INVALID_HANDLE, "destroyed handle: lmc_retrieve (synchronous)");
  s = lmc_retrieve(&r, e, &q, &job);
  EXPECT(s, LMC_E_INVALID_HANDLE, "destroyed handle: lmc_retrieve (job)");
  s = lmc_prefetch_start(&job, e, &q);
  EXPECT(s, LMC_E_INVALID_HANDLE, "destroyed handle: lmc_prefetch_start");
  memset(&st, 0, sizeof st);
  st.struct_size = (uint32_t)sizeof st;
  s = lmc_engine_get_stats(e, &st);
  EXPECT(s, LMC_E_INVALID_HANDLE, "destroyed handle: lmc_engine_get_stats");
  s = lmc_engine_clear(e);
  EXPECT(s, LMC_E_INVALID_HANDLE, "destroyed handle: lmc_engine_clear");
  report(tr_is_blank(&r) && lr_is_blank(&lr) && needed == SENTINEL_I64 && job == SENTINEL_JOB,
         "destroyed handle: out-parameters untouched (results, needed_out, job_out)");
  {
    int untouched = 1;
    size_t k;
    for (k = 0; k < BUF_ELEMS; k++)
      if (src.mem[0][k] != GUARD_VALUE || src.mem[1][k] != GUARD_VALUE) untouched = 0;
    report(untouched, "destroyed handle: previously registered KV memory untouched");
  }
  lmc_engine_destroy(e);
  capture_message();
  report(g_msg[0] != '\0', "lmc_engine_destroy twice is a no-op that says why (\"%.100s\")", g_msg);

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
  lmc_lookup_result lr = lr_blank();
  lmc_transfer_result tr = tr_blank();
  lmc_request q = req_tokens(NULL, 0, NULL);
  int i, bad = 0;
  bogus[0] = (lmc_engine *)(uintptr_t)0x1;
  bogus[1] = (lmc_engine *)(void *)&local;
  bogus[2] = (lmc_engine *)(uintptr_t)0xdeadbeef000ull;
  bogus[3] = (lmc_engine *)(uintptr_t)UINTPTR_MAX;
  for (i = 0; i < 4; i++) {
    lmc_status s1, s2, s3, s4, s5;
    memset(&st, 0, sizeof st);
    st.struct_size = (uint32_t)sizeof st;
    s1 = lmc_engine_get_stats(bogus[i], &st);
    s2 = lmc_lookup(&lr, bogus[i], &q);
    s3 = lmc_engine_clear(bogus[i]);
    s4 = lmc_job_wait(&tr, (lmc_job *)bogus[i], 0);
    s5 = lmc_retrieve(&tr, bogus[i], &q, NULL);
    lmc_engine_destroy(bogus[i]);
    lmc_job_destroy((lmc_job *)bogus[i]);
    if (s1 != LMC_E_INVALID_HANDLE || s2 != LMC_E_INVALID_HANDLE || s3 != LMC_E_INVALID_HANDLE ||
        s4 != LMC_E_INVALID_HANDLE || s5 != LMC_E_INVALID_HANDLE) {
      fprintf(stderr, "# foreign handle %p: get_stats %s, lookup %s, clear %s, job_wait %s, retrieve %s\n",
              (void *)bogus[i], sname(s1), sname(s2), sname(s3), sname(s4), sname(s5));
      bad++;
    }
  }
  return bad ? 1 : 0;
}

static void test_foreign_handles(void) {
  report_probe(spawn_probe("foreign-handle", NULL, NULL),
               "unknown handles (0x1, a stack address, 0xdeadbeef000, ~0) -> LMC_E_INVALID_HANDLE "
               "from get_stats, lookup, clear, job_wait, retrieve; engine and job destroy are "
               "no-ops");
}

int main(int argc, char **argv) {
  if (argc >= 3 && strcmp(argv[1], "--probe") == 0) {
    if (strcmp(argv[2], "foreign-handle") == 0) return probe_foreign_handles();
    fprintf(stderr, "unknown probe %s\n", argv[2]);
    return 2;
  }
  harness_init();
  test_create();
  test_get_config();
  test_config_schema();
  test_destroyed_handle();
  test_foreign_handles();
  return harness_finish("engine_config");
}
