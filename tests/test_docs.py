"""The docs stay true to the repository: links resolve, every command and config key is documented,
the README stays a front page, and nothing points outside the repository.

Commands and config keys are discovered from the code, so what other changes add is covered too.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from mvrec.config import Config
from test_cli import registered_commands  # one walk of the Typer app for both test files

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, -N for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(prose(page.read_text(encoding="utf-8")))]


def test_docs_exist():
    names = {p.name for p in DOCS}
    for name in ("cli.md", "configuration.md", "extraction.md", "store.md", "flows.md", "gpu.md",
                 "recommender.md", "deploy.md", "demo.md", "benchmarks.md", "troubleshooting.md"):
        assert name in names, f"docs/{name} is missing"


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move details to docs/"
    for doc in DOCS:  # every page is reachable from the front page, directly or through another page
        assert any(f"({prefix}{doc.name}" in page.read_text(encoding="utf-8")
                   for page, prefix in [(ROOT / "README.md", "docs/"), *[(d, "") for d in DOCS if d != doc]]), \
            f"nothing links to docs/{doc.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
            continue
        try:
            dest.relative_to(ROOT)
        except ValueError:
            broken.append(f"{target} (outside the repository)")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_the_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [bad](missing.md) `[code](not-a-link.md)`\n"
                    "```\n[fenced](nor-this.md)\n```\n")
    assert links(page) == ["#title", "missing.md"]
    assert anchors(page) == {"title"}


@pytest.mark.parametrize("command", registered_commands(), ids=" ".join)
def test_every_command_is_in_the_cli_reference(command):
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    pattern = r"mvrec\s+" + r"\s+".join(map(re.escape, command)) + r"(?![\w-])"
    assert re.search(pattern, text), f"`mvrec {' '.join(command)}` is not in docs/cli.md's command table"


def config_keys() -> list[tuple[str, str]]:
    hints = typing.get_type_hints(Config)
    return [(section, f.name) for section in hints for f in dataclasses.fields(hints[section])]


@pytest.mark.parametrize("section, key", config_keys(), ids=lambda v: v)
def test_every_config_key_is_in_the_configuration_reference(section, key):
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    m = re.search(rf"^### `\[{section}\]`\n(.*?)(?=^#|\Z)", text, re.S | re.M)
    assert m, f"docs/configuration.md has no section ### `[{section}]`"
    assert f"| `{key}` |" in m.group(1), f"{section}.{key} is not in docs/configuration.md under [{section}]"


# Patterns built in pieces so that this file does not match itself.
OUTSIDE = [re.escape(p) for p in ("../" + "shared", "ARCHITECTURE" + ".md", "PAPER" + ".md")] + [
    r"(?<![\w.])/" + "work/", r"(?<![\w.~])/" + "root/"]
SKIP_DIRS = {".git", ".venv", ".mvrec", "__pycache__", ".pytest_cache", ".ruff_cache", "node_modules",
             "tests", "bench"}  # tests and benches may use outside data when they skip cleanly without it
TEXT = {".py", ".md", ".toml", ".yaml", ".yml", ".txt", ".cfg", ".ini", ".sh", ".env", ".json"}


def project_files() -> list[Path]:
    out = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
            continue
        if path.is_file() and (path.suffix in TEXT or path.name in {"Makefile", "run", ".dockerignore"}
                               or path.name.startswith("Dockerfile")):
            out.append(path)
    return out


def test_nothing_refers_outside_the_repository():
    files = project_files()
    assert ROOT / "README.md" in files and ROOT / "mvrec" / "config.py" in files
    hits = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for pattern in OUTSIDE:
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                hits.append(f"{path.relative_to(ROOT)}:{line}: {m.group(0)}")
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


def test_the_store_page_states_the_schema_the_code_writes():
    """docs/store.md: the schema version of storage.schema, and every column of every table."""
    from storage.schema import ALL_TABLES, SCHEMA_VERSION

    text = (ROOT / "docs" / "store.md").read_text(encoding="utf-8")
    assert {int(v) for v in re.findall(r"[Ss]chema version (\d+)", text)} == {SCHEMA_VERSION}
    assert f"v{SCHEMA_VERSION} added" in text, "the list of versions stops before the current one"
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", text, re.M)}
    for name, spec in ALL_TABLES.items():
        missing = [c for c in spec.schema.names if not re.search(rf"\b{c}\b", rows.get(name, ""))]
        assert not missing, f"docs/store.md, table {name}: no column {missing}"
