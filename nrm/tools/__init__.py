"""Programs built on nrm.client: the demo, the perf wrapper, reports."""
