"""The README is a guide that cannot rot (issue 47): its Python blocks run as written, in a
fresh process each, and it stays short enough to read in five minutes."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, user_env

README = open(os.path.join(ROOT, "README.md")).read()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_the_readme_is_short():
    assert len(README.splitlines()) <= 300 and len(README.split()) <= 3000


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_each_python_block_of_the_readme_runs_as_written(index, tmp_path):
    env = user_env()
    r = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_the_readme_has_its_python_blocks():
    assert len(BLOCKS) >= 2 and any("jax.jvp" in b and "jax.vmap" in b for b in BLOCKS)
