/*
 * Helpers shared by libnrm.so and libnrm-pmpi.so.  Exported from libnrm.so
 * (the interposer links against it) but not part of the public API.
 */
#ifndef NRM_INTERNAL_H
#define NRM_INTERNAL_H

#include <stdint.h>

/* "10ms", "500us", "2s", "0.5ms", or a bare number of nanoseconds. */
int nrm_parse_duration_ns(const char *text, uint64_t *out);

/* NRM_RATELIMIT, or 10 ms when unset or invalid (invalid values warn). */
uint64_t nrm_ratelimit_from_env(void);

#endif
