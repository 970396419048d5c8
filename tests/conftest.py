import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("MPLBACKEND", "Agg")

from tests.bb_fixture import make_bb_root  # noqa: E402


@pytest.fixture(scope="session")
def bb(tmp_path_factory):
    """The miniature BadNets record on CIFAR-10 layout data, shared by the whole session (read-only)."""
    return make_bb_root(tmp_path_factory.mktemp("bb"))


def run_script(script: str, *args, cwd=None, timeout: int = 600):
    """Run a visual_*.py as a user would (own process, any working directory)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=timeout, env=env)


@pytest.fixture
def script():
    return run_script
