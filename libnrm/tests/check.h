/* The one assertion macro of libnrm's C tests: count failures, keep going. */
#ifndef NRM_TESTS_CHECK_H
#define NRM_TESTS_CHECK_H

#include <stdio.h>

static int failures;

#define CHECK(cond)                                                             \
	do {                                                                    \
		if (!(cond)) {                                                  \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__,  \
				__LINE__, #cond);                               \
			failures++;                                             \
		}                                                               \
	} while (0)

#endif
