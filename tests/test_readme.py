"""The documentation's Python snippets (README and every page of docs/) run as written
against a running stack (only its address replaces 127.0.0.1:8443/8444, and ./.ppml-serve is
the stack's state directory); the configuration reference is what the settings say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ppml_serve.settings_reference import reference_markdown, undocumented

from .conftest import Stack

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPETS = [(page.relative_to(ROOT), snippet) for page in PAGES
            for snippet in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)]


def test_the_docs_have_snippets() -> None:
    assert len(SNIPPETS) >= 4
    assert any(str(page) == "README.md" for page, _ in SNIPPETS)


@pytest.mark.parametrize(("page", "snippet"), SNIPPETS,
                         ids=[f"{page}-{i}" for i, (page, _) in enumerate(SNIPPETS)])
def test_doc_snippet_runs(stack: Stack, page: Path, snippet: str, tmp_path: Path) -> None:
    (tmp_path / ".ppml-serve").symlink_to(stack.settings.state_dir.resolve())
    host_port = stack.url.removeprefix("https://")
    code = snippet.replace("127.0.0.1:8443", host_port).replace(
        "127.0.0.1:8444", stack.local.grpc_address)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"\[\d( \d)*\]", done.stdout), done.stdout


def test_the_readme_starts_with_the_two_commands() -> None:
    first = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert first is not None
    commands = [line.split("#")[0].strip() for line in first.group(1).splitlines()]
    assert commands == ["./dev.sh up", "./dev.sh test"]


def test_the_configuration_reference_is_current_and_complete() -> None:
    assert undocumented() == [], "every setting says what it does (a docstring under it)"
    page = (ROOT / "docs" / "configuration-reference.md").read_text()
    assert page == reference_markdown(), \
        "regenerate: python -m ppml_serve.settings_reference > docs/configuration-reference.md"
