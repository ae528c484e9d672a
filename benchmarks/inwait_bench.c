/*
 * Cost of the interposer's in-wait throttling steps, without MPI
 * (libnrm/src/inwait.h, emulated counter backend in a temp directory):
 *
 *   arm_disarm   a wait predicted long that ends before the delay (1 s):
 *                two timer_settime calls
 *   fire_latency from arming a 1 ns timer to the handler having run: the
 *                kernel's timer and signal delivery (added to the delay)
 *   exit         the exit of a throttled wait: the thread's cpu clock read
 *                and the counter write (on the rank's critical path)
 *
 * usage: inwait_bench COUNTER_DIR [calls]
 * prints "arm_disarm_ns=X fire_latency_ns=Y exit_ns=Z"
 */
#define _GNU_SOURCE
#include "inwait.h"

static uint64_t ns(void)
{
	return nrm_iw_clock(CLOCK_MONOTONIC);
}

int main(int argc, char **argv)
{
	long calls = argc > 2 ? atol(argv[2]) : 20000;
	uint64_t t0, arm = 0, fire = 0, leave = 0;

	if (argc < 2)
		return 2;
	setenv("NRM_INWAIT_COUNTERS", argv[1], 1);
	setenv("NRM_INWAIT_DELAY", "1s", 1);
	if (!nrm_iw_init())
		return 1;
	for (long i = 0; i < calls; i++) {
		t0 = ns();
		if (nrm_iw_enter())
			nrm_iw_leave();
		arm += ns() - t0;
	}
	nrm_iw.delay_ns = 1;
	for (long i = 0; i < calls; i++) {
		uint64_t t1;

		t0 = ns();
		if (!nrm_iw_enter())
			return 1;
		while (!nrm_iw_t.fired)
			;
		t1 = ns();
		nrm_iw_leave();
		fire += t1 - t0;
		leave += ns() - t1;
	}
	printf("arm_disarm_ns=%.1f fire_latency_ns=%.1f exit_ns=%.1f\n", (double)arm / calls,
	       (double)fire / calls, (double)leave / calls);
	return 0;
}
