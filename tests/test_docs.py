"""The docs stay true to the repository: links resolve, every command and config key is documented,
the README stays a front page, and nothing points outside the repository.

Commands and config keys are discovered from the code, so what other changes add is covered too.
"""

from __future__ import annotations

import dataclasses
import datetime
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


def heading_ids(path: Path) -> list[tuple[int, str | None, str]]:
    """Each line outside fenced code as (heading level or 0, GitHub's heading id or None, line).
    The id: lower case, punctuation dropped, spaces to hyphens, -N for repeats."""
    seen: dict[str, int] = {}
    out = []
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            out.append((0, None, line))
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(2).replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.append((len(m.group(1)), slug if n == 0 else f"{slug}-{n}", line))
    return out


def anchors(path: Path) -> set[str]:
    return {slug for _, slug, _ in heading_ids(path) if slug}


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


def test_every_gpu_default_is_in_the_configuration_reference():
    """GPU_DEFAULTS replace embedded defaults on CUDA; each key's row says so, with the value."""
    from mvrec.config import GPU_DEFAULTS

    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for (section, key), value in GPU_DEFAULTS.items():
        m = re.search(rf"^### `\[{section}\]`\n(.*?)(?=^#|\Z)", text, re.S | re.M)
        row = re.search(rf"^\| `{key}` \|([^|]*)\|", m.group(1), re.M) if m else None
        assert row and f"{value} on CUDA" in row.group(1), \
            f"docs/configuration.md, [{section}] {key}: the default column does not say '{value} on CUDA'"


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


# --- figures: docs/benchmarks.md's rule (stated at its top) ---------------------------------------

FIGURES_PAGES = ("benchmarks.md", "results.md")  # pages of dated figures that others quote
DATE = re.compile(r"(?<![\d-])(\d{4}-\d\d-\d\d)(?![\d-])")
NUMBER = r"\d+(?:,\d{3})*(?:\.\d+)?"
# A figure: a number (or a range of two) with a unit. "2-core", "x86_64" and dates are not figures.
FIGURE = re.compile(rf"(?<![\w.,/-])({NUMBER})(?:\s?[–-]\s?({NUMBER}))?\s?"
                    r"(%|×|x(?=[\s,;).])|ms\b|s\b|min\b|h\b|days?\b|[KMGT]i?B\b|TB/s|TFLOP/s|videos/s|cores?\b)")
BENCH_PATH = re.compile(r"(?<![\w/.])bench/[a-z0-9_./-]+\.(?:py|sh)\b")  # lower case: bench/NAME.py is a placeholder


def own_sections(page: Path, chapters: bool = False) -> list[tuple[str, str]]:
    """(heading line, the heading and its own text up to the next heading of any level) for levels 2
    and below; chapters=True: one per `##` section, its subsections included."""
    out: list[tuple[int, str, list[str]]] = []
    for level, slug, line in heading_ids(page):
        if slug and (not chapters or level <= 2):
            out.append((level, line.strip(), []))
        elif out:
            out[-1][2].append(line)
    return [(head, head + "\n" + "\n".join(body)) for level, head, body in out if level >= 2]


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {t for line in re.findall(r"^([\w .-]+):(?!=)", text, re.M) for t in line.split()}


def source_problems(text: str, today: datetime.date) -> list[str]:
    """What a section that gives figures lacks: its date, and what printed them."""
    problems = []
    dates = DATE.findall(text)
    if not dates:
        problems.append("no date (YYYY-MM-DD)")
    for d in dates:
        try:
            if datetime.date.fromisoformat(d) > today:
                problems.append(f"date {d} is after today")
        except ValueError:
            problems.append(f"{d} is not a date")
    benches = BENCH_PATH.findall(text)
    missing = [b for b in benches if not (ROOT / b).exists()]
    problems += [f"{b} does not exist" for b in missing]
    commands = {c[0] for c in registered_commands()}
    named = [b for b in benches if b not in missing]
    named += [t for t in re.findall(r"`make ([\w-]+)", text) if t in make_targets()]
    named += [c for c in re.findall(r"`mvrec ([\w-]+)", text) if c in commands]
    if not named:
        problems.append("names no existing bench/NAME.py, `make TARGET` or `mvrec COMMAND` that printed its figures")
    return problems


def undated_sections(page: Path, today: datetime.date, chapters: bool = False) -> list[str]:
    return [f"{page.name}, '{head}': {'; '.join(problems)}"
            for head, body in own_sections(page, chapters)
            if FIGURE.search(prose(body)) and (problems := source_problems(body, today))]


def test_every_benchmark_section_names_its_date_and_what_printed_it():
    today = datetime.date.today()
    bad = undated_sections(ROOT / "docs" / "benchmarks.md", today)
    bad += undated_sections(ROOT / "docs" / "results.md", today, chapters=True)  # dated per chapter
    assert not bad, "docs/benchmarks.md's rule (at its top) is broken:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_bench_exists(page):
    missing = sorted({b for b in BENCH_PATH.findall(page.read_text(encoding="utf-8")) if not (ROOT / b).exists()})
    assert not missing, f"{page.relative_to(ROOT)} names benches that do not exist: {missing}"


def anchored_sections(page: Path) -> dict[str, str]:
    """Heading id -> the section's text with its subsections (what a link to #id points at)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for level, slug, line in heading_ids(page):
        if slug:
            stack = [(lvl, s) for lvl, s in stack if lvl < level] + [(level, slug)]
            out[slug] = ""
            continue
        for _, s in stack:
            out[s] += line + "\n"
    return out


def numbers(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in re.findall(NUMBER, text)]


def quoted_as_given(quoted: str, given: list[float]) -> bool:
    """The quoted number is one the section gives, to the quoted precision (rounding aside)."""
    decimals = len(quoted.partition(".")[2])
    q = float(quoted.replace(",", ""))
    return any(abs(g - q) <= 0.5 * 10 ** -decimals + 1e-9 for g in given)


def blocks(text: str) -> list[str]:
    """Paragraphs, list items and table rows: the unit a link and its figures share."""
    return [b for b in re.split(r"\n\s*\n|\n(?=\s*(?:[-*|]|\d+\.)\s)", FENCE.sub("", text)) if b.strip()]


def misquoted_figures(page: Path, pages: dict[str, dict[str, str]]) -> list[str]:
    bad = []
    for block in blocks(page.read_text(encoding="utf-8")):
        targets = re.findall(r"\]\((?:docs/)?(" + "|".join(map(re.escape, pages)) + r")#([\w-]+)\)", block)
        if not targets:
            continue
        given = [n for name, anchor in targets for n in numbers(pages[name].get(anchor, ""))]
        text = re.sub(r"\[[^\]]*\]\([^)]*\)", "", block)  # link texts and targets hold no figures
        for m in FIGURE.finditer(re.sub(r"`[^`\n]*`", "", text)):
            wrong = [n for n in m.group(1, 2) if n and not quoted_as_given(n, given)]
            if wrong:
                where = ", ".join(f"{name}#{anchor}" for name, anchor in targets)
                bad.append(f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page.name}: "
                           f"'{m.group(0)}' is not in {where}")
    return bad


def figure_pages() -> dict[str, dict[str, str]]:
    return {name: anchored_sections(ROOT / "docs" / name) for name in FIGURES_PAGES}


@pytest.mark.parametrize("page", [p for p in PAGES if p.name not in FIGURES_PAGES],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_figures_quoted_next_to_a_benchmark_link_are_the_benchmarks(page):
    bad = misquoted_figures(page, figure_pages())
    assert not bad, "figures that differ from the section they link to:\n" + "\n".join(bad)


def test_the_figure_checks_see_an_undated_section_and_a_misquoted_figure(tmp_path):
    bench = tmp_path / "benchmarks.md"
    bench.write_text("# B\n\n## Dated\n\n2026-12-01, `bench/scale.py`: 9.39 videos/s, 0.41–0.62 s.\n\n"
                     "## Undated\n\n`bench/scale.py`: 12% faster.\n\n## Future\n\n2999-01-01, `make test`: 3 min.\n\n"
                     "## Unprinted\n\n2026-12-01, by hand: 7 s.\n\n## Gone\n\n2026-12-01, `bench/nope.py`: 5 s.\n\n"
                     "## No figures\n\nProse only.\n")
    bad = undated_sections(bench, datetime.date(2026, 12, 7))
    assert [b.split("'")[1] for b in bad] == ["## Undated", "## Future", "## Unprinted", "## Gone"]
    assert "after today" in bad[1] and "bench/nope.py does not exist" in bad[3]
    page = tmp_path / "gpu.md"
    page.write_text("A commit of 256 took 0.48 s ([b](benchmarks.md#dated)).\n\n"
                    "- rate 9.4 videos/s and 0.4–0.6 s ([b](benchmarks.md#dated))\n"
                    "- 12% faster, not linked, not checked\n")
    assert misquoted_figures(page, {"benchmarks.md": anchored_sections(bench)}) == [
        "gpu.md: '0.48 s' is not in benchmarks.md#dated"]
