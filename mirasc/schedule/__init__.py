"""Kernel schedules: how the chunk step's graph is split into kernels, loops and buffers."""
