"""The teaching labs (docs/labs/) are whole: every student sheet has the parts an
instructor relies on, and every question has an answer in the key kept apart.

Their commands run in tests/test_doc_examples.py (it reads docs/labs/ too); this file
checks the structure only, so it is fast.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

LABS = Path(__file__).resolve().parents[1] / "docs" / "labs"
SECTIONS = ("Learning goals", "Time", "Before you start", "Steps", "What you should observe",
            "Questions")
ISSUE_LABS = ("toy-os", "cloaking", "attestation", "migration", "protocol", "design")


def sheets() -> list[Path]:
    return sorted(p for p in LABS.glob("[0-9]-*.md"))


def sections(text: str) -> dict[str, str]:
    """'## Title' -> the text up to the next '## ' heading (fenced blocks skipped)."""
    out, title, body, fence = {}, None, [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        if not fence and line.startswith("## "):
            if title is not None:
                out[title] = "\n".join(body)
            title, body = line[3:].strip(), []
        else:
            body.append(line)
    if title is not None:
        out[title] = "\n".join(body)
    return out


def numbers(text: str) -> list[int]:
    """The numbers of a markdown numbered list (top level only)."""
    return [int(m.group(1)) for m in re.finditer(r"^(\d+)\. \S", text, re.M)]


def test_the_six_labs_of_the_issue_are_there_in_order():
    names = [p.stem for p in sheets()]
    assert [n.split("-", 1)[0] for n in names] == [str(i) for i in range(1, 7)]
    assert [n.split("-", 1)[1] for n in names] == list(ISSUE_LABS)


@pytest.mark.parametrize("sheet", sheets(), ids=lambda p: p.name)
def test_each_lab_has_its_sections_in_order(sheet):
    parts = sections(sheet.read_text())
    present = [s for s in parts if s in SECTIONS]
    assert present == list(SECTIONS), f"{sheet.name}: sections {list(parts)}"
    assert re.search(r"\d+(–\d+)? minutes", parts["Time"]), f"{sheet.name}: no time estimate"
    assert parts["Learning goals"].count("\n* ") >= 2, f"{sheet.name}: list the goals"
    assert "```" in parts["Steps"] and "```text" in parts["What you should observe"]


@pytest.mark.parametrize("sheet", sheets(), ids=lambda p: p.name)
def test_each_question_has_an_answer_in_the_key(sheet):
    questions = numbers(sections(sheet.read_text())["Questions"])
    assert questions == list(range(1, len(questions) + 1)) and len(questions) >= 5, \
        f"{sheet.name}: questions numbered {questions}"
    key = LABS / "answers" / sheet.name
    assert key.exists(), f"no answer key {key.relative_to(LABS)}"
    assert numbers(key.read_text()) == questions, f"{key.name}: answers do not match questions"


def test_the_answers_are_kept_apart_from_the_sheets():
    """A student sheet links the instructor's guide at most, never the key."""
    for sheet in sheets():
        assert "answers/" not in sheet.read_text(), sheet.name
    assert {p.name for p in (LABS / "answers").glob("*.md")} == {p.name for p in sheets()}


def test_the_instructors_guide_lists_every_lab():
    guide = (LABS / "README.md").read_text()
    for sheet in sheets():
        assert f"]({sheet.name})" in guide, sheet.name
    for part in ("Order and prerequisites", "How to run a session", "How to grade"):
        assert f"## {part}" in guide
