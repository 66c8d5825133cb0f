"""The scenario sandbox over real git work trees: clones on a branch even when the work tree's
HEAD is detached (CI checkouts, `git worktree add` at a commit), the real repository untouched."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import write_config
from mcpopt.config import load_config
from mcpopt.optimize.sandbox import SANDBOX_BRANCH, sandbox_config


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=30)
    return proc.stdout.strip()


def _repo(path: Path) -> Path:
    path.mkdir()
    _git(path, "init", "-q", "-b", "main")
    _git(path, "config", "user.name", "t")
    _git(path, "config", "user.email", "t@example.invalid")
    (path / "a.txt").write_text("one\n", encoding="utf-8")
    _git(path, "add", "a.txt")
    _git(path, "commit", "-q", "-m", "one")
    (path / "a.txt").write_text("two\n", encoding="utf-8")
    _git(path, "commit", "-q", "-am", "two")
    return path


@pytest.mark.parametrize("detached", [False, True])
def test_a_clone_is_on_a_branch_at_the_work_trees_commit(tmp_path: Path, detached: bool) -> None:
    repo = _repo(tmp_path / "repo")
    if detached:
        _git(repo, "checkout", "-q", "--detach", "HEAD~1")
    head = _git(repo, "rev-parse", "HEAD")
    config = load_config(
        write_config(tmp_path / "g.yaml", {"git": {"command": "git-server", "args": ["--repository", str(repo)]}})
    )
    box = sandbox_config(config)
    try:
        clone = Path(box.mapping[str(repo)])
        assert _git(clone, "rev-parse", "HEAD") == head
        # A branch to base new branches on: what mcp-server-git's git_create_branch needs.
        assert _git(clone, "symbolic-ref", "--short", "HEAD") == (SANDBOX_BRANCH if detached else "main")
        _git(clone, "checkout", "-q", "-b", "feature")
        (clone / "a.txt").write_text("three\n", encoding="utf-8")
        _git(clone, "commit", "-q", "-am", "three")
        # The real work tree is as it was: same HEAD, no new branch, file unchanged.
        assert _git(repo, "rev-parse", "HEAD") == head
        assert SANDBOX_BRANCH not in _git(repo, "branch", "--list") and "feature" not in _git(repo, "branch", "--list")
        assert (repo / "a.txt").read_text(encoding="utf-8") == ("one\n" if detached else "two\n")
        assert box.config.mcpServers["git"].args == ["--repository", str(clone)]
    finally:
        box.cleanup()
