"""Coding swarms on one git repository: a worktree per claim, the branch as the
task's checkpoint, and a merge queue.

- :mod:`cflow.gitflow.git`: the adapter to the ``git`` binary, fenced pushes.
- :mod:`cflow.gitflow.worktrees`: a process's clone and its worktrees (stale ones cleaned).
- :mod:`cflow.gitflow.branch`: take the task branch, work-in-progress checkpoints.
- :mod:`cflow.gitflow.executor`: ``cfctl worker --repo``, any executor in a worktree.
- :mod:`cflow.gitflow.queue`: the merge queue as a pure fold of ``merge`` events.
- :mod:`cflow.gitflow.merger`: ``cfctl merge-queue``, one merger at a time.
- :mod:`cflow.gitflow.report`: merge analytics (``cfctl report merges``).
"""
