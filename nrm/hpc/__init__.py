"""HPC launchers and schedulers: MPI flavours, Slurm."""
