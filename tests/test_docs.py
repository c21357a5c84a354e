"""The docs hold together: every relative link and #anchor in README.md and docs/*.md resolves
(anchors by GitHub's heading-slug rule), and the README keeps the shape a user reads first."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]

#: the README's limits (issue 29): short, install and the train command on the first screen
README_MAX_LINES = 160
FIRST_SCREEN = 30
#: the two set-up commands the README opens with (CI runs the test command)
SETUP_COMMANDS = ("bash scripts/demo.sh", "bash scripts/test.sh")
#: experiments/finetune_experiment.py --publish writes between these lines
RESULTS_MARKERS = ("<!-- results table: experiments/finetune_experiment.py --publish -->",
                   "<!-- end of results table -->")

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"`[^`]*`")
# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)   # http:, https:, mailto:, ...


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, every character that is not a
    letter, digit, space, hyphen or underscore dropped, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)      # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)                              # inline HTML tags
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes for the headings of ``path`` (repeated slugs get -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text()):
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in the prose of ``path`` (inline code left out)."""
    found = []
    for number, line in prose_lines(path.read_text()):
        for match in _LINK.finditer(_INLINE_CODE.sub("", line)):
            found.append((number, match.group(1)))
    return found


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """The relative links and anchors of ``path`` that do not resolve, one line each (paths shown
    relative to ``root``)."""
    broken = []
    for number, target in links(path):
        if _EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not resolved.exists():
            broken.append(f"{where}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{where}: no heading with anchor #{anchor} in {resolved.relative_to(root)}")
    return broken


# == the checker itself =============================================================================
@pytest.mark.parametrize("heading, slug", [
    ("Install and fine-tune", "install-and-fine-tune"),
    ("Which checkpoint to fine-tune: `nnUNetv2_acnorm_rank`", "which-checkpoint-to-fine-tune-nnunetv2_acnorm_rank"),
    ("The GPU check: `bash scripts/gpu_check.sh`", "the-gpu-check-bash-scriptsgpu_checksh"),
    ("`-pretrained_weights` is read once", "-pretrained_weights-is-read-once"),
    ("Checkpoints you can trust (`--c`, `--val`, predict, fold)", "checkpoints-you-can-trust---c---val-predict-fold"),
    ("`ct_to_mr` (CT organs -> MR organs; the demo's transfer)", "ct_to_mr-ct-organs---mr-organs-the-demos-transfer"),
    ("1. The layer", "1-the-layer"),
    ("Speed and memory (`benchmarks/benchmark_trainer.py`)", "speed-and-memory-benchmarksbenchmark_trainerpy"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_a_broken_link_and_a_broken_anchor_are_found(tmp_path):
    doc = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# Title\n\n## A section\n\n## A section\n")
    doc.write_text("# Here\n\n[ok](b.md#a-section) [ok](b.md#a-section-1) [ok](#here) [ext](https://x.org/y.md)\n"
                   "[gone](c.md) [bad](b.md#no-such) [bad](#nowhere)\n```\n[in code](d.md)\n```\n`[inline](e.md)`\n")
    assert broken_links(doc, root=tmp_path) == ["a.md:4: c.md: no such file", "a.md:4: b.md#no-such: no heading with anchor #no-such in b.md",
                     "a.md:4: #nowhere: no heading with anchor #nowhere in a.md"]


# == the docs =======================================================================================
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(doc):
    broken = broken_links(doc)
    assert not broken, "\n".join(broken)


def test_every_doc_is_reachable_from_the_readme():
    linked = {(README.parent / target.partition("#")[0]).resolve() for _, target in links(README)
              if not _EXTERNAL.match(target) and target.partition("#")[0]}
    unlinked = [p.name for p in DOCS[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs/ pages the README does not link: {unlinked}"


def test_readme_shape():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    first_screen = "\n".join(lines[:FIRST_SCREEN])
    assert "pip install" in first_screen and "nnUNetv2_train" in first_screen
    assert re.search(r"nnUNetv2_train .*-tr nnUNetTrainerACNorm .*-pretrained_weights", first_screen)
    opening = [line for line in lines[:10] if line.startswith("bash ")]
    assert [line.split("#")[0].strip() for line in opening] == list(SETUP_COMMANDS)


def test_readme_keeps_the_results_markers():
    lines = README.read_text().splitlines()
    start, end = (lines.index(marker) for marker in RESULTS_MARKERS)
    assert all(lines.count(marker) == 1 for marker in RESULTS_MARKERS) and start < end
