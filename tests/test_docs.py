"""Every section of docs/math.md that the code cites exists.

The code cites the math document by section number, in comments and docstrings: "docs/math.md
section 6", "docs/math.md sections 2, 3 and 4", "docs/math.md 5-7", "(docs/math.md 1, 6, 7)", a
citation may also continue on the next comment line. These tests find every such citation in the
repository's .py files and check each cited number against the `## N. Title` headings of
docs/math.md, so renumbering or removing a section cannot leave a citation pointing at the wrong
text. A mention of the document without a number ("the docs/math.md formulas") cites no section.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MATH_DOC = "docs/math.md"
HEADING = re.compile(r"^## (\d+)\. \S", re.MULTILINE)
# Directories that hold no project source: virtual environments, caches, build outputs.
SKIPPED_DIRS = {"__pycache__", "build", "dist", "node_modules"}

# Pieces of a citation. Between words: spaces, line breaks and the `#` of a continued comment.
_GAP = r"[\s#]*"
_NUMBER = r"\d+\b"
_RANGE = rf"{_NUMBER}(?:{_GAP}[-\u2013\u2014]{_GAP}{_NUMBER}|[\s#]+to[\s#]+{_NUMBER})?"
_LIST_SEPARATOR = rf"(?:{_GAP},{_GAP}(?:and[\s#]+)?|[\s#]+and[\s#]+|{_GAP}&{_GAP})"
_SECTION_WORD = r"(?i:sections?\b|sec\.|\u00a7)"


def citation_pattern(document: str) -> re.Pattern:
    """The regex of a numbered citation of `document`: its path, an optional comma or opening
    parenthesis, an optional "section(s)" / "sec." / "§", then one or more numbers or ranges
    (N-M, N–M, N to M) separated by ",", "and", ", and" or "&". Group "numbers" holds the list."""
    return re.compile(
        rf"{re.escape(document)}{_GAP}[,(]?{_GAP}(?:{_SECTION_WORD}{_GAP})?"
        rf"(?P<numbers>{_RANGE}(?:{_LIST_SEPARATOR}{_RANGE})*)"
    )


def cited_sections(numbers: str) -> list[int]:
    """The section numbers of a matched number list, ranges expanded: "2, 5-7 and 9" -> [2, 5, 6, 7, 9].

    Raises ValueError for a range that does not go up (a typo such as "7-5" would cite nothing).
    """
    sections = []
    for item in re.split(_LIST_SEPARATOR, numbers):
        bounds = [int(n) for n in re.findall(r"\d+", item)]
        if len(bounds) == 2 and bounds[0] >= bounds[1]:
            raise ValueError(f"the range {item.strip()!r} does not go up")
        sections.extend(range(bounds[0], bounds[-1] + 1))
    return sections


@dataclass(frozen=True)
class Citation:
    """One citation: where it is (path relative to the repository, 1-based line), its text and sections."""

    path: str
    line: int
    text: str
    sections: tuple[int, ...]


def python_files(root: Path) -> list[Path]:
    """Every .py file of the repository, outside hidden directories (.venv, .git), caches and builds."""
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs
                            if not d.startswith(".") and d not in SKIPPED_DIRS and not d.endswith(".egg-info"))
        files.extend(Path(directory) / name for name in sorted(names) if name.endswith(".py"))
    return files


def find_citations(root: Path, document: str = MATH_DOC, exclude: tuple[Path, ...] = ()) -> list[Citation]:
    """Every numbered citation of `document` in the .py files under `root` (minus `exclude`)."""
    pattern = citation_pattern(document)
    found = []
    for path in python_files(root):
        if path.resolve() in exclude:
            continue
        source = path.read_text(encoding="utf-8")
        for match in pattern.finditer(source):
            line = source.count("\n", 0, match.start()) + 1
            text = " ".join(match.group(0).split())
            found.append(Citation(str(path.relative_to(root)), line, text,
                                  tuple(cited_sections(match.group("numbers")))))
    return found


def math_sections() -> list[int]:
    """The numbers of the `## N. Title` headings of docs/math.md, in document order."""
    return [int(n) for n in HEADING.findall((REPO / MATH_DOC).read_text(encoding="utf-8"))]


@pytest.mark.parametrize(("text", "sections"), [
    ("docs/math.md section 6", [6]),
    ("docs/math.md sections 1 and 8", [1, 8]),
    ("docs/math.md sections 2, 3 and 4", [2, 3, 4]),
    ("docs/math.md sections 2, 3, and 4", [2, 3, 4]),
    ("from docs/math.md (sections 2, 5 and 6) independently", [2, 5, 6]),
    ("(docs/math.md 1, 6, 7):", [1, 6, 7]),
    ("docs/math.md 3 and 4 (IPO uses", [3, 4]),
    ("docs/math.md 5-7 literally", [5, 6, 7]),
    ("docs/math.md 2\u20134", [2, 3, 4]),
    ("docs/math.md sections 5 to 7", [5, 6, 7]),
    ("docs/math.md 1, 5-7 and 9", [1, 5, 6, 7, 9]),
    ("docs/math.md, Section 10", [10]),
    ("docs/math.md \u00a7 3", [3]),
    ("docs/math.md 7; m, s of the LSE", [7]),
    ("docs/math.md 6: u = Delta", [6]),
    ("(docs/math.md 2); near alpha = 0", [2]),
    ("# as in docs/math.md\n    # sections 2 and\n    # 3, the", [2, 3]),
])
def test_citation_forms(text: str, sections: list[int]) -> None:
    """The parser reads each citation form the code uses (or may use) as the right list of sections."""
    matches = list(citation_pattern(MATH_DOC).finditer(text))
    assert len(matches) == 1, f"{text!r}: expected one citation, found {[m.group(0) for m in matches]}"
    assert cited_sections(matches[0].group("numbers")) == sections, text


@pytest.mark.parametrize("text", [
    "the docs/math.md formulas",
    "as docs/math.md writes them",
    "docs/math.md.",
    "MATH.md section 3",
])
def test_mentions_without_a_section_are_not_citations(text: str) -> None:
    assert not citation_pattern(MATH_DOC).search(text)


def test_a_range_must_go_up() -> None:
    with pytest.raises(ValueError, match="does not go up"):
        cited_sections(citation_pattern(MATH_DOC).search("docs/math.md 7-5").group("numbers"))


def test_math_headings_are_numbered_from_zero_without_gaps() -> None:
    """`## N.` headings run 0, 1, 2, ... in order: a citation's number names exactly one section."""
    sections = math_sections()
    assert sections == list(range(len(sections))), f"{MATH_DOC} section headings out of order: {sections}"


def test_every_cited_section_exists() -> None:
    """Each section number cited in a .py file is a `## N.` heading of docs/math.md."""
    citations = find_citations(REPO, exclude=(Path(__file__).resolve(),))
    assert citations, f"no .py file cites a numbered section of {MATH_DOC}: the check would pass vacuously"
    headings = set(math_sections())
    missing = [f"{c.path}:{c.line}: {c.text!r} cites section {n}"
               for c in citations for n in c.sections if n not in headings]
    assert not missing, f"citations of sections that {MATH_DOC} does not have:\n" + "\n".join(missing)
