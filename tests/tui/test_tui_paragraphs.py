"""tui.paragraphs: a panel that repaints only its changed lines must show
exactly what a Textual Static shows for the same text, at any width, after
any sequence of updates, and repaint no line that did not change."""

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.text import Text
from textual.app import App, ComposeResult
from textual.containers import Horizontal
from textual.widgets import Static

from tui.paragraphs import Paragraphs

STYLES = ["", "bold", "dim", "green4", "bold black on yellow", "grey35", "italic"]


class Counting(Paragraphs):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.asked: list[int] = []      # the lines the compositor rendered

    def render_line(self, y):
        self.asked.append(y)
        return super().render_line(y)


class Pair(App):
    CSS = "Static, Counting { width: 1fr; }"

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield Static(id="static")
            yield Counting(id="para")


def _cells(strip):
    """A line's text and look, without Textual's selection offsets (meta)."""
    out = []
    for seg in strip:
        s = seg.style
        look = None if s is None else (s.color, s.bgcolor, s.bold, s.dim, s.italic, s.reverse)
        if seg.text:
            out.append((seg.text, look))
    return out


def _same_screen(app):
    s, p = app.query_one("#static", Static), app.query_one("#para", Counting)
    assert s.size == p.size
    for y in range(s.size.height):
        assert _cells(p.render_line(y)) == _cells(s.render_line(y)), f"line {y}"


line = st.lists(st.tuples(st.text("ab cdef·█✱", max_size=30), st.sampled_from(STYLES)), max_size=4)


@settings(derandomize=True, max_examples=12, deadline=None)
@given(texts=st.lists(st.lists(line, min_size=1, max_size=6), min_size=1, max_size=4),
       width=st.sampled_from([24, 40, 70]), trailing=st.booleans())
def test_paragraphs_show_what_a_static_shows(texts, width, trailing):
    def build(lines):
        t = Text()
        for i, parts in enumerate(lines):
            for s, style in parts:
                t.append(s, style=style)
            if i < len(lines) - 1 or trailing:
                t.append("\n")
        return t

    async def main():
        app = Pair()
        async with app.run_test(size=(width, 12)) as pilot:
            for lines in texts:
                t = build(lines)
                app.query_one("#static", Static).update(t)
                app.query_one("#para", Counting).put(t)
                await pilot.pause()
                _same_screen(app)
            app.theme = "textual-light"         # other colours: nothing stale may stay
            await pilot.pause()
            _same_screen(app)
    asyncio.run(main())


def test_only_the_changed_line_is_repainted():
    async def main():
        app = Pair()
        async with app.run_test(size=(80, 12)) as pilot:
            para = app.query_one("#para", Counting)
            lines = [f"line {i}" for i in range(6)]
            para.put(Text("\n".join(lines)))
            await pilot.pause()
            para.asked.clear()
            lines[3] = "line three, changed"
            para.put(Text("\n".join(lines)))
            await pilot.pause()
            assert para.asked == [3]
            assert "line three, changed" in para.render_line(3).text
            para.asked.clear()
            para.put(Text("\n".join(lines + ["a new line"])))       # taller: laid out, all painted
            await pilot.pause()
            assert sorted(set(para.asked)) == list(range(7)) and para.size.height == 7
    asyncio.run(main())
