"""Shared pieces of the CLI tests: tiny run settings and a `main` call that captures output."""

from esper.cli import main

TINY = ["--envs", "2", "--max-epochs", "3", "--set", "env.batches_per_step=2"]
TINY_PPO = [*TINY, "--set", "ppo.hidden=16", "--set", "ppo.embed=16"]


def run_cli(capsys, *argv):
    """``esper *argv`` in-process; returns (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
