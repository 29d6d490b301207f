"""What produced a result: the git state recorded with every sweep."""

from __future__ import annotations

import subprocess
from pathlib import Path

import sweeper
from sweeper.provenance import git_state, provenance


def test_outside_a_checkout_the_code_that_ran_is_recorded(tmp_path, monkeypatch):
    """A launch from a directory outside any checkout recorded git_sha None (MLflow's tag read 'None')
    though sweeper itself ran from a checkout."""
    monkeypatch.chdir(tmp_path)
    assert git_state(tmp_path) == {"git_sha": None, "git_dirty": None, "git_repo": None}
    code = git_state(Path(sweeper.__file__).parent)
    got = provenance()
    assert (got["git_sha"], got["git_repo"]) == (code["git_sha"], code["git_repo"])
    # Inside a checkout, it is the project's own.
    project = tmp_path / "project"
    project.mkdir()
    run = lambda *a: subprocess.run(["git", *a], cwd=project, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (project / "space.py").write_text("x = 1\n")
    run("add", "space.py")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    monkeypatch.chdir(project)
    got = provenance()
    assert got["git_repo"] == str(project.resolve()) and got["git_dirty"] is False
    assert len(got["git_sha"]) == 40


def test_the_recorded_command_can_be_typed_again():
    from sweeper.provenance import command_line

    assert command_line(["/x/sweeper/cli.py", "launch", "s.py", "--local"]) == "sweeper launch s.py --local"
    assert command_line(["/usr/bin/sweeper", "launch", "s.py", "note=a b"]) == "sweeper launch s.py 'note=a b'"
