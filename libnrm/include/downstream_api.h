/* Seed-era name of the libnrm header; programs that include it keep
 * building. */
#include "nrm.h"
