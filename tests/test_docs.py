"""The documentation holds together: every "§N" the repository cites is a section of
docs/design.md, and every relative link in README.md and docs/*.md points at a file that exists."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
CITED_SUFFIXES = (".py", ".sh", ".md")
# A citation: "§4a", "§ 7"; "§1-§5" cites both ends.
CITATION = re.compile(r"§\s*(\d+[a-z]?)")
# A design section heading: "## 4a. Residual text guidance ...".
HEADING = re.compile(r"^##\s+(\d+[a-z]?)\.\s", re.MULTILINE)
# A Markdown link or image: [text](target) / ![alt](target), target without spaces.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
EXTERNAL = ("http://", "https://", "mailto:", "#")


def repository_files() -> list[Path]:
    """Tracked files (git), or every non-hidden file when the tree is not a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
        return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [p for p in ROOT.rglob("*") if p.is_file()
                and not any(part.startswith(".") or part == "__pycache__"
                            for part in p.relative_to(ROOT).parts)]


def design_sections() -> set[str]:
    return set(HEADING.findall(DESIGN.read_text(encoding="utf-8")))


def test_design_keeps_the_spec_numbering():
    # 1..11 and 4a: code comments written against the spec cite these numbers.
    expected = {str(n) for n in range(1, 12)} | {"4a"}
    assert design_sections() == expected


def test_every_cited_section_exists():
    sections = design_sections()
    missing = []
    for path in repository_files():
        if path.suffix not in CITED_SUFFIXES:
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            missing += [f"{path.relative_to(ROOT)}:{lineno}: §{s}"
                        for s in CITATION.findall(line) if s not in sections]
    assert not missing, ("sections cited but absent from docs/design.md (add the section or fix "
                         "the citation):\n" + "\n".join(missing))


def test_the_design_is_cited_inside_the_repository():
    # The spec lives in docs/design.md; a fork has no ../shared.
    stale = [f"{p.relative_to(ROOT)}" for p in repository_files()
             if p.suffix in CITED_SUFFIXES and p != Path(__file__).resolve()
             and ("../shared/" in p.read_text(encoding="utf-8")
                  or "DESIGN §" in p.read_text(encoding="utf-8"))]
    assert not stale, f"cite docs/design.md instead of ../shared/DESIGN.md in: {stale}"


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def test_relative_links_resolve():
    broken = []
    for page in markdown_pages():
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if target.startswith(EXTERNAL):
                continue
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "relative links to missing files:\n" + "\n".join(broken)


def test_link_pattern_finds_links_and_images():
    # The link check above is only as good as its pattern.
    text = "see [the spec](docs/design.md#5-similarity), ![fig](bench/results/a.png), [web](https://x.org)"
    assert LINK.findall(text) == ["docs/design.md#5-similarity", "bench/results/a.png",
                                  "https://x.org"]
    assert CITATION.findall("(§1-§5, § 10, §4a)") == ["1", "5", "10", "4a"]
