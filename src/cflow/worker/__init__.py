"""The agent runtime (``cfctl worker``) and its executors: subprocess, docker, claude."""

from cflow.worker.executor import RESULT_CAP_BYTES, Executor, Outcome, TaskContext
from cflow.worker.runtime import Worker, WorkerOptions, WorkerStats

__all__ = [
    "RESULT_CAP_BYTES",
    "Executor",
    "Outcome",
    "TaskContext",
    "Worker",
    "WorkerOptions",
    "WorkerStats",
]
