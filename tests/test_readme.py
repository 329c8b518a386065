"""The README's Python snippets run as written against a running stack (only its address
replaces 127.0.0.1:8443/8444, and ./.ppml-serve is the stack's state directory)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Stack

README = Path(__file__).parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet-{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(stack: Stack, snippet: str, tmp_path: Path) -> None:
    (tmp_path / ".ppml-serve").symlink_to(stack.settings.state_dir.resolve())
    host_port = stack.url.removeprefix("https://")
    code = snippet.replace("127.0.0.1:8443", host_port).replace(
        "127.0.0.1:8444", stack.local.grpc_address)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"\[\d( \d)*\]", done.stdout), done.stdout
