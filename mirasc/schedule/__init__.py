"""Kernel schedules: how the chunk step's graph is split into kernels, loops and buffers."""

from mirasc.schedule.kernels import Buffer, KernelPlan, Schedule, schedule

__all__ = ["Buffer", "KernelPlan", "Schedule", "schedule"]
