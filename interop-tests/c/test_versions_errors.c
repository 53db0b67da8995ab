/*
 * test_versions_errors.c — versions, status names and the thread's last error message.
 */
#include "harness.h"

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
  report(LMC_ABI_VERSION == 2 && LMC_VERSION_NUMBER == 300,
         "the header is ABI 2, version 0.3.0 (LMC_ABI_VERSION %d, LMC_VERSION_NUMBER %d)",
         (int)LMC_ABI_VERSION, (int)LMC_VERSION_NUMBER);
  report(vs != NULL && strcmp(vs, want) == 0, "lmc_version_string() = \"%s\" (header \"%s\")",
         vs ? vs : "(NULL)", want);
  report(vs == vs2, "lmc_version_string() returns static storage (same pointer twice)");
}

static void test_status_names(void) {
  /* The statuses are 0, -1, … -11 without gaps, in this order. */
  static const char *const names[] = {
      "LMC_OK",           "LMC_E_INVALID_ARGUMENT", "LMC_E_INVALID_HANDLE",
      "LMC_E_UNSUPPORTED", "LMC_E_OUT_OF_MEMORY",   "LMC_E_NOT_FOUND",
      "LMC_E_IO",         "LMC_E_CUDA",             "LMC_E_NO_DEVICE",
      "LMC_E_BUFFER_TOO_SMALL", "LMC_E_INTERNAL",   "LMC_E_TIMEOUT",
  };
  static const lmc_status values[] = {
      LMC_OK,      LMC_E_INVALID_ARGUMENT, LMC_E_INVALID_HANDLE,   LMC_E_UNSUPPORTED,
      LMC_E_OUT_OF_MEMORY, LMC_E_NOT_FOUND, LMC_E_IO,               LMC_E_CUDA,
      LMC_E_NO_DEVICE, LMC_E_BUFFER_TOO_SMALL, LMC_E_INTERNAL,     LMC_E_TIMEOUT,
  };
  static const lmc_status unknown[] = {1, 2, -12, -13, -100, INT32_MIN, INT32_MAX};
  int i, walked = 0;
  for (i = 0; i < (int)(sizeof names / sizeof names[0]); i++) {
    const char *n = lmc_status_name((lmc_status)-i);
    report(values[i] == -i && n != NULL && strcmp(n, names[i]) == 0,
           "lmc_status_name(%d) = \"%s\" (want \"%s\")", -i, n ? n : "(NULL)", names[i]);
  }
  for (i = 0; i < (int)(sizeof unknown / sizeof unknown[0]); i++) {
    const char *n = lmc_status_name(unknown[i]);
    report(n != NULL && strcmp(n, "LMC_E_UNKNOWN") == 0, "lmc_status_name(%ld) = \"%s\"",
           (long)unknown[i], n ? n : "(NULL)");
  }
  /* What a binding does: ask from 0 downwards until "LMC_E_UNKNOWN". */
  for (i = 0; i < 1000; i++) {
    const char *n = lmc_status_name((lmc_status)-i);
    if (n == NULL || strcmp(n, "LMC_E_UNKNOWN") == 0) break;
    walked++;
  }
  report(walked == 12, "walking lmc_status_name from 0 downwards finds %d names before LMC_E_UNKNOWN (want 12)",
         walked);
  report(lmc_status_name(LMC_E_IO) == lmc_status_name(LMC_E_IO),
         "lmc_status_name returns static storage (same pointer twice)");
}

static void test_last_error(void) {
  const char *m = lmc_last_error_message();
  char first[2048];
  lmc_status s;
  int64_t needed = SENTINEL_I64;
  lmc_engine *e = NULL;
  report(m != NULL && m[0] == '\0', "lmc_last_error_message() before any failure is \"\"");

  s = lmc_engine_get_config(&needed, NULL, NULL, 0);
  EXPECT(s, LMC_E_INVALID_HANDLE, "lmc_engine_get_config(engine NULL) sets a message");
  snprintf(first, sizeof first, "%s", g_msg);
  m = lmc_last_error_message();
  report(m != NULL && strcmp(m, first) == 0,
         "lmc_last_error_message() reads the same message twice");

  /* Functions that cannot fail leave the message as it was. */
  (void)lmc_version_number();
  (void)lmc_abi_version();
  (void)lmc_version_string();
  (void)lmc_status_name(LMC_E_IO);
  (void)lmc_status_name(-99);
  m = lmc_last_error_message();
  report(m != NULL && strcmp(m, first) == 0,
         "versions and lmc_status_name leave the last error message unchanged (\"%.100s\")",
         m ? m : "(NULL)");

  /* A success clears it. */
  s = lmc_engine_create(&e, NULL, "m", 1, 0);
  EXPECT(s, LMC_OK, "lmc_engine_create after a failure clears the message");
  lmc_engine_destroy(e);
}

int main(void) {
  harness_init();
  test_versions();
  test_status_names();
  test_last_error();
  return harness_finish("versions_errors");
}
