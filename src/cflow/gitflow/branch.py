"""The task branch as the task's checkpoint: start, work-in-progress commits, fenced pushes.

Theory of operation
-------------------
An attempt works on ``cflow/<task-id>`` of the shared remote. It starts from the
branch's head if an earlier attempt pushed one, else from the base branch. Its
first act is to *take* the branch: an empty commit naming the task, attempt and
epoch, pushed with the head it started from as the expected old value. From then
on every push (work in progress at heartbeats, the final one) expects the commit
this attempt pushed last. So pushes are fenced the way lease writes are: once a
successor took the branch, any late push of an earlier holder is refused
(:class:`~cflow.gitflow.git.PushRefused`), and the successor's own work is never
overwritten. A predecessor's late push that lands *before* the successor takes
the branch is not lost either: the successor's take is then refused, and it
starts again from the new head, commits included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cflow.gitflow.git import IDENTITY, GitError, PushRefused, git, git_status, push_fenced
from cflow.gitflow.worktrees import WorkArea, tracking

TAKE_TRIES = 5


def local_branch(branch: str, epoch: int) -> str:
    return f"{branch}@{epoch}"


def branch_name(task_id: str, labels: dict[str, str] | None = None) -> str:
    """``cflow/<task-id>``, or the branch a retry continues (label ``cflow.branch``)."""
    return (labels or {}).get("cflow.branch") or f"cflow/{task_id}"


@dataclass
class BranchAttempt:
    """One attempt's worktree on its task branch."""

    area: WorkArea
    task_id: str
    epoch: int
    attempt: int
    branch: str
    base: str
    path: Path
    base_head: str  # the base branch's commit when the attempt started
    previous_head: str | None  # the branch head an earlier attempt left (None: new branch)
    pushed: str  # the remote branch's commit as this attempt last set it (the fence)
    conflicts: list[str] = field(default_factory=list)  # files left conflicted by the rebase
    pushes: int = 0

    @property
    def ref(self) -> str:
        return f"refs/heads/{self.branch}"

    async def head(self) -> str:
        return await git("rev-parse", "HEAD", cwd=self.path)

    async def checkpoint(self, message: str) -> str | None:
        """Commit whatever changed and push it, fenced; returns the new head or None (nothing).

        Raises:
            PushRefused: a successor took the branch; this attempt is fenced off.
            GitError: git failed otherwise.
        """
        await git("add", "--all", cwd=self.path)
        status = await git("status", "--porcelain", cwd=self.path)
        merging = (await git_status("rev-parse", "-q", "--verify", "MERGE_HEAD",
                                    cwd=self.path))[0] == 0
        if status.strip() or merging:
            await git("commit", "--quiet", "--no-verify", "-m", message,
                      "-m", self.trailer(), cwd=self.path, env=IDENTITY)
        head = await self.head()
        if head == self.pushed:
            return None
        if (await git_status("merge-base", "--is-ancestor", self.pushed, head,
                             cwd=self.path))[0] != 0:
            raise GitError(f"{self.branch} was rewritten in the worktree: {head[:12]} does not "
                           f"contain {self.pushed[:12]} (pushed before); not pushed, so no "
                           "earlier work is dropped", branch=self.branch)
        await push_fenced(self.area.repo, head, self.ref, self.pushed)
        self.pushed = head
        self.pushes += 1
        return head

    def trailer(self) -> str:
        return f"Cflow-Task: {self.task_id}\nCflow-Epoch: {self.epoch}"

    async def has_work(self) -> bool:
        """Whether the branch carries anything the base does not (besides empty commits)."""
        diff = await git("diff", "--name-only", f"{self.base_head}...{self.pushed}",
                         cwd=self.path)
        return bool(diff.strip())

    @property
    def local_branch(self) -> str:
        """The worktree's local branch: one per claim, so two attempts of a task in one
        clone never share (and move) each other's branch."""
        return local_branch(self.branch, self.epoch)

    async def close(self) -> None:
        await self.area.remove(self.path)
        await git_status("branch", "-D", self.local_branch, cwd=self.area.repo)


async def start_attempt(area: WorkArea, *, task_id: str, epoch: int, attempt: int,
                        base: str, labels: dict[str, str] | None = None,
                        rebase: bool = False) -> BranchAttempt:
    """Make the attempt's worktree and take the task branch (fenced), see the module doc.

    With ``rebase`` (a retry after a rejected merge) the current base is merged into
    the branch after taking it; conflicts stay in the files for the task to resolve
    and are listed in ``conflicts``.

    Raises:
        GitError: the base branch does not exist, or git failed.
        PushRefused: the branch kept moving under us (``TAKE_TRIES`` times).
    """
    branch = branch_name(task_id, labels)
    ref = f"refs/heads/{branch}"
    base_ref = f"refs/heads/{base}"
    name = f"{task_id}-{epoch}"
    for _ in range(TAKE_TRIES):
        heads = await area.heads(base_ref, ref)
        base_head = heads[base_ref]
        if base_head is None:
            raise GitError(f"the remote has no branch {base!r}", base=base)
        previous = heads[ref]
        path = await area.add(name, previous or base_head, branch=local_branch(branch, epoch))
        try:
            await git("commit", "--quiet", "--allow-empty", "--no-verify", "-m",
                      f"cflow: {task_id} attempt {attempt} starts (epoch {epoch})",
                      "-m", f"Cflow-Task: {task_id}\nCflow-Epoch: {epoch}",
                      cwd=path, env=IDENTITY)
            taken = await git("rev-parse", "HEAD", cwd=path)
            await push_fenced(area.repo, taken, ref, previous)
        except PushRefused:
            await area.remove(path)
            continue  # someone pushed meanwhile: start again from the new head
        except BaseException:
            await area.remove(path)
            raise
        run = BranchAttempt(area=area, task_id=task_id, epoch=epoch, attempt=attempt,
                            branch=branch, base=base, path=path, base_head=base_head,
                            previous_head=previous, pushed=taken, pushes=1)
        if rebase and previous is not None:
            code, _, _ = await git_status(
                "merge", "--no-ff", "--no-edit", "-m", f"cflow: merge {base} into {branch}",
                tracking(base_ref), cwd=path, env=IDENTITY)
            if code != 0:
                unmerged = await git("diff", "--name-only", "--diff-filter=U", cwd=path)
                run.conflicts = [line for line in unmerged.splitlines() if line]
                if not run.conflicts:  # not a conflict: give up on the rebase
                    await git_status("merge", "--abort", cwd=path)
        return run
    raise PushRefused(f"branch {branch} kept moving; could not take it", ref=ref, expected=None)


__all__ = ["BranchAttempt", "branch_name", "start_attempt"]
