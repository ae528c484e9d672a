"""Containers: slices, tasks, launches and runtimes (a wing of nrmd)."""
