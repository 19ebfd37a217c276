import subprocess
import sys

from esper import __version__


def _esper(*args):
    return subprocess.run(
        [sys.executable, "-m", "esper", *args], capture_output=True, text=True, timeout=120
    )


def test_version_and_help():
    out = _esper("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"esper {__version__}"
    out = _esper("--help")
    assert out.returncode == 0 and "usage: esper" in out.stdout
