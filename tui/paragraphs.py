"""A widget that repaints only the lines whose text changed.

A Textual ``Static`` renders its whole text again on every update, and an
update of an auto-height Static lays out the whole screen again.  Most
panels change a line or two a step (a register, the vclock, one row of the
memory map), so a screen update redid ~25 ms of work for that at 120x40
(``tui.bench``, issue 15's 50 ms goal).  :class:`Paragraphs` keeps each
line of its text (a "paragraph": it may wrap to several screen lines)
with the strips Textual rendered for it, renders only the paragraphs that
changed, marks only their screen lines dirty, and asks for a new layout
only when its height changed.  Each paragraph goes through the same Textual
rendering a Static uses (``Visual.to_strips``), so the screen is the same.
"""

from __future__ import annotations

from rich.text import Text
from textual.geometry import Region
from textual.strip import Strip
from textual.visual import Visual, visualize
from textual.widget import Widget


class Paragraphs(Widget):
    """Shows a rich Text; ``put(text)`` replaces it, repainting what changed."""

    DEFAULT_CSS = "Paragraphs { height: auto; }"

    def __init__(self, **kw):
        super().__init__(**kw)
        self._text = Text()
        self._paras: list[Text] = [Text()]
        self._strips: list[list[Strip] | None] = [None]     # per paragraph, at self._shape
        self._shape = None          # (width, visual style) the strips were rendered for
        self._flat: list[Strip] | None = None       # all paragraphs' strips, in order
        self._known: dict = {}      # paragraph -> its strips at self._shape (a log's lines move up)

    @property
    def content(self) -> Text:
        """The whole text shown (what a Static's ``content`` would be)."""
        return self._text

    def render(self) -> Text:
        return self._text

    # A Static's text is one Content: its lines are the text's lines, each wrapped
    # to the width, and a trailing newline is one more (blank) line; the same here.
    def put(self, text: Text) -> None:
        paras = text.split("\n", allow_blank=True) or [Text()]
        old, self._text = self._paras, text
        shape = self._current_shape()
        self._flat = None
        if shape is None or shape != self._shape or len(paras) != len(old):
            self._paras, self._strips = paras, [None] * len(paras)
            self.refresh(layout=self._auto_height)
            return
        y, dirty, moved = 0, [], False
        for i, (a, b) in enumerate(zip(old, paras)):
            height = len(self._strips[i]) if self._strips[i] is not None else None
            if a != b or self._strips[i] is None:
                self._strips[i] = self._render_para(b, shape)
                moved |= height != len(self._strips[i])
                dirty.append(Region(0, y, shape[0], len(self._strips[i])))
            y += len(self._strips[i])
        self._paras = paras
        if moved:                       # a paragraph wraps to more or fewer lines
            self.refresh(layout=self._auto_height)
        elif dirty:
            self.refresh(*dirty)

    @property
    def _auto_height(self) -> bool:
        # Only a widget whose height follows its text needs a new layout when the
        # text grows or shrinks (fixed heights are set in tui.app's CSS).
        return self.styles.height is None or self.styles.height.is_auto

    def _current_shape(self):
        width = self.size.width
        return (width, self.visual_style) if width > 0 else None

    def _render_para(self, para: Text, shape) -> list[Strip]:
        if len(self._known) > 4 * len(self._paras) + 64:
            self._known = {}
        key = (para.plain, tuple(para.spans), para.style)
        strips = self._known.get(key)
        if strips is None:
            visual = visualize(self, para, markup=False)
            strips = Visual.to_strips(self, visual, shape[0], None, self.visual_style) or [Strip.blank(0)]
            self._known[key] = strips
        return strips

    def _lines(self, width: int) -> list[Strip]:
        shape = (width, self.visual_style)
        if shape != self._shape:
            self._shape, self._strips, self._flat, self._known = shape, [None] * len(self._paras), None, {}
        if self._flat is None:
            out: list[Strip] = []
            for i, p in enumerate(self._paras):
                if self._strips[i] is None:
                    self._strips[i] = self._render_para(p, shape)
                out.extend(self._strips[i])
            self._flat = out
        return self._flat

    def get_content_height(self, container, viewport, width: int) -> int:
        return len(self._lines(width)) if width > 0 else len(self._paras)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        lines = self._lines(width)
        return lines[y] if y < len(lines) else Strip.blank(width, self.visual_style.rich_style)

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._shape = self._flat = None         # a theme change: colours differ, render again
        self._known = {}
