"""README.md stays true: its Python examples run, and its CLI examples name real commands."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_examples_run(index, tmp_path):
    code = PYTHON_BLOCKS[index].replace("...", "pass")
    os.symlink(os.path.join(REPO, "merge_configs"), tmp_path / "merge_configs")
    script = tmp_path / "example.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"README python block {index} failed:\n{code}\n{r.stderr[-3000:]}"


def test_first_commands_are_install_merge_then_tests():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert "pip install torch==2.13.0" in blocks[0] and "mergekit-lite run merge_configs/" in blocks[0]
    assert blocks[1].strip() == "python -m pytest"
    ci = open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read()
    assert ci.strip().splitlines()[-1] == blocks[1].strip()
