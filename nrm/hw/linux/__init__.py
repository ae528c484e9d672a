"""The Linux backend: powercap/MSR RAPL, clock modulation, cpufreq and hwmon under a root."""
