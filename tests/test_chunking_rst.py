"""reStructuredText is chunked by section like Markdown: headings found the way docutils finds
them (underline, optional overline, levels by first appearance of each style), and the things
that only look like headings (short underlines, transitions, literal blocks, directive bodies,
indented lines) left as text."""

from __future__ import annotations

import pytest

from brainforge.memory.chunking import Chunker, ChunkingConfig, detect_language


def words(texts):  # a deterministic token counter: whitespace-separated words
    return [len(t.split()) for t in texts]


def chunker(max_tokens=400, min_tokens=1):
    return Chunker(words, ChunkingConfig(max_tokens=max_tokens, min_tokens=min_tokens, overlap_lines=1))


def sections(text, path="docs/guide.rst", **sizes):
    """(first line, name) of every chunk; all must be sections."""
    chunks = chunker(**sizes).chunk(path, text)
    assert chunks and all(c.kind == "section" and c.language == "restructuredtext" for c in chunks), chunks
    return [(c.start_line, c.name) for c in chunks]


def test_rst_extensions_are_restructuredtext_and_txt_stays_prose():
    assert detect_language("docs/index.rst") == "restructuredtext"
    assert detect_language("docs/INDEX.REST") == "restructuredtext"
    assert detect_language("notes.txt") == "text"
    # a .txt file that happens to contain reST adornments is still cut by paragraphs
    chunks = chunker().chunk("notes.txt", "Title\n=====\n\nSome words.\n\nOther\n-----\n\nMore words.\n")
    assert {c.kind for c in chunks} == {"text"} and {c.name for c in chunks} == {None}


GUIDE = """\
=======
 Guide
=======

What this guide is for.

Install
=======

Before installing, read this.

Linux
-----

Run make install.

Windows
-------

Run setup.exe.

Details
~~~~~~~

Registry keys.

Usage
=====

Run make demo.
"""


def test_heading_styles_get_levels_by_first_appearance_and_trail_names():
    # styles in order: "=" with overline (1), "=" alone (2), "-" (3), "~" (4)
    assert sections(GUIDE) == [
        (1, "Guide"),  # the overline is the section's first line
        (7, "Guide > Install"),
        (12, "Guide > Install > Linux"),
        (17, "Guide > Install > Windows"),
        (22, "Guide > Install > Windows > Details"),
        (27, "Guide > Usage"),  # back to level 2: the deeper trail is dropped
    ]
    chunks = chunker().chunk("docs/guide.rst", GUIDE)
    linux = chunks[2]
    assert (linux.start_line, linux.end_line) == (12, 16)  # up to the line before the next heading
    assert linux.text.startswith("# Section: Guide > Install > Linux (docs/guide.rst:12-16)\nLinux\n-----\n")


def test_text_before_the_first_heading_is_its_own_unnamed_section():
    text = "A preamble paragraph.\n\nTitle\n=====\n\nBody.\n"
    assert sections(text) == [(1, None), (3, "Title")]


def test_markdown_and_rst_share_the_section_path():
    md = "# Guide\n\nIntro words here.\n\n## Install\n\nInstall words.\n\n## Usage\n\nUsage words.\n"
    rst = "Guide\n=====\n\nIntro words here.\n\nInstall\n-------\n\nInstall words.\n\nUsage\n-----\n\nUsage words.\n"
    md_chunks, rst_chunks = chunker().chunk("g.md", md), chunker().chunk("g.rst", rst)
    assert [(c.kind, c.name) for c in md_chunks] == [(c.kind, c.name) for c in rst_chunks] == [
        ("section", "Guide"), ("section", "Guide > Install"), ("section", "Guide > Usage")]
    merged_md, merged_rst = chunker(min_tokens=30).chunk("g.md", md), chunker(min_tokens=30).chunk("g.rst", rst)
    assert [c.name for c in merged_md] == [c.name for c in merged_rst] == ["Guide, Guide > Install, Guide > Usage"]


@pytest.mark.parametrize("case, text, expected", [
    ("underline shorter than the title",
     "Real\n====\n\nNot a title at all\n=====\n\nwords\n", [(1, "Real")]),
    ("overline and underline shorter than the title",
     "Real\n====\n\n====\nToo long a title\n====\n\nwords\n", [(1, "Real")]),
    ("transition between paragraphs",
     "Real\n====\n\nFirst paragraph.\n\n----------\n\nSecond paragraph.\n", [(1, "Real")]),
    ("transition right after a heading",
     "Real\n====\n\n--------\n\nText\n", [(1, "Real")]),
    ("indented literal block after ::",
     "Real\n====\n\nExample::\n\n    Fake\n    ====\n\nAfter\n-----\n", [(1, "Real"), (9, "Real > After")]),
    ("quoted literal block after ::",
     "Real\n====\n\nA diff::\n\n++++++++\n+ added\n++++++++\n\nAfter\n-----\n", [(1, "Real"), (10, "Real > After")]),
    ("code-block directive body",
     "Real\n====\n\n.. code-block:: rst\n   :linenos:\n\n   Fake\n   ====\n\n   ----\n   Fake\n   ----\n\nAfter\n-----\n",
     [(1, "Real"), (14, "Real > After")]),
    ("comment body",
     "Real\n====\n\n..\n   Fake\n   ====\n\nAfter\n-----\n", [(1, "Real"), (8, "Real > After")]),
    ("indented title",
     "Real\n====\n\n  Quoted\n  ======\n\n  Quoted\n--------\n", [(1, "Real")]),
    ("title that is not the first line of its paragraph",
     "Real\n====\n\nA paragraph line\nthen more\n=========\n", [(1, "Real")]),
    ("adornment over adornment",
     "Real\n====\n\n-----\n=====\n-----\n", [(1, "Real")]),
    ("wide characters need a wider underline",
     "Real\n====\n\n日本語\n=====\n\n漢字\n----\n", [(1, "Real"), (7, "Real > 漢字")]),
])
def test_things_that_only_look_like_headings(case, text, expected):
    assert sections(text) == expected, case


@pytest.mark.parametrize("case, text, expected", [
    ("target line directly above a title",
     "Intro\n\n.. _install:\nInstall\n=======\n\nx\n", [(1, None), (4, "Install")]),
    ("title directly under a title",
     "Title\n=====\nSub\n---\ntext\n", [(1, "Title"), (3, "Title > Sub")]),
    ("inset title between over- and underline",
     "==========\n  Inset\n==========\n\nx\n", [(1, "Inset")]),
    ("one-letter title, trailing spaces ignored",
     "A  \n=\n\nx\n\nLonger title   \n------------   \n\ny\n", [(1, "A"), (6, "A > Longer title")]),
    ("title right after the end of a literal block",
     "Ex::\n\n    code\nTitle\n=====\n\nx\n", [(1, None), (4, "Title")]),
])
def test_headings_docutils_also_finds(case, text, expected):
    assert sections(text) == expected, case


def test_big_section_is_split_by_paragraphs_keeping_its_name():
    paragraphs = "\n\n".join(" ".join(f"w{p}_{i}" for i in range(20)) for p in range(6))
    text = f"Guide\n=====\n\nShort intro.\n\nBig\n---\n\n{paragraphs}\n\nSmall\n-----\n\nEnd.\n"
    chunks = chunker(max_tokens=60).chunk("docs/guide.rst", text)
    big = [c for c in chunks if c.name == "Guide > Big"]
    assert len(big) >= 3 and all(c.kind == "section" for c in big)
    assert big[0].start_line == 6 and big[-1].end_line == 19
    assert all(b.start_line <= a.end_line + 1 for a, b in zip(big, big[1:]))  # contiguous (overlap allowed)
    assert all(words([c.text])[0] <= 60 for c in big)
    assert [c.name for c in chunks if c.name != "Guide > Big"] == ["Guide", "Guide > Small"]


@pytest.mark.parametrize("max_tokens", [400, 40, 15])
def test_chunks_cover_every_non_blank_line(max_tokens):
    text = GUIDE + "\n" + "\n\n".join(" ".join(f"x{p}_{i}" for i in range(9)) for p in range(8)) + "\n"
    chunks = chunker(max_tokens=max_tokens).chunk("docs/guide.rst", text)
    covered = {n for c in chunks for n in range(c.start_line, c.end_line + 1)}
    non_blank = {n for n, line in enumerate(text.splitlines(), 1) if line.strip()}
    assert non_blank <= covered
    assert all(c.kind == "section" and c.name for c in chunks)


def test_real_file_every_heading_starts_a_section(tmp_path):
    from pydoc_data.topics import topics

    text = topics["assignment"]
    (tmp_path / "x.rst").write_text(text, encoding="utf-8")
    lines = (tmp_path / "x.rst").read_text(encoding="utf-8").splitlines()
    # An independent look: a flush-left line underlined by one character repeated as far as it.
    expected = [(n + 1, line.strip()) for n, (line, under) in enumerate(zip(lines, lines[1:]))
                if line.strip() and not line[0].isspace() and len(set(line.strip())) > 1
                and under.strip() and len(set(under.rstrip())) == 1 and under[0] in "*=-"
                and len(under.rstrip()) >= len(line.rstrip())]
    assert len(expected) >= 3 and expected[0] == (1, "Assignment statements")
    chunks = chunker(max_tokens=150, min_tokens=3).chunk("x.rst", "\n".join(lines))
    assert all(c.kind == "section" for c in chunks)
    starts = {c.start_line: c.name for c in chunks}
    for line, title in expected:
        assert line in starts and starts[line].endswith(title), (line, title, starts)
    assert starts[1] == "Assignment statements"
    assert any(name.startswith("Assignment statements > ") for name in starts.values())
