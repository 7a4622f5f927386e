"""A widget that repaints only the lines whose text changed.

A Textual ``Static`` renders its whole text again on every update, and an
update of an auto-height Static lays out the whole screen again.  Most
panels change a line or two a step (a register, the vclock, one row of the
memory map; the log's lines move up by one), so each screen update redid
all of it: 15-50 ms of the UI thread at 120x40 (``tui.bench``, issue 15's
goal: the event loop never blocked longer than 50 ms).

:class:`Paragraphs` splits its text into lines ("paragraphs": each may wrap
to several screen lines), renders a paragraph it has not seen at this width
through the same Textual path a Static uses (``Visual.to_strips``, so the
screen is the same), keeps the result by the paragraph's text, marks only
the screen lines of changed paragraphs dirty, and asks for a new layout
only when an auto-height panel's height changed.
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
    KEEP = 64           # rendered paragraphs kept beyond those shown (a log's recent lines)

    def __init__(self, **kw):
        super().__init__(**kw)
        self._text = Text()
        self._paras: list[Text] = [Text()]
        self._known: dict = {}          # (width, style, paragraph) -> its strips
        self._flat: list[Strip] | None = None       # the screen lines at _flat_shape
        self._flat_shape = None

    @property
    def content(self) -> Text:
        """The whole text shown (what a Static's ``content`` would be)."""
        return self._text

    def render(self) -> Text:
        return self._text

    def put(self, text: Text) -> None:
        # A Static's text is one Content: its lines are the text's lines, each wrapped
        # to the width, and a trailing newline is one more (blank) line; the same here.
        paras = text.split("\n", allow_blank=True) or [Text()]
        width = self.size.width
        if width <= 0:
            # Not laid out yet, or hidden (one column at a time below 110 columns):
            # showing it lays the screen out anyway, with this text.
            self._paras, self._text, self._flat = paras, text, None
            self.refresh()
            return
        before = self.get_content_height(None, None, width)
        old, self._paras, self._text, self._flat = self._paras, paras, text, None
        if self._auto_height and self.get_content_height(None, None, width) != before:
            self.refresh(layout=True)           # taller or shorter: the screen is laid out again
            return
        if len(paras) != len(old):
            self.refresh()                      # the same height (a map's is fixed): repaint it
            return
        style = self.visual_style
        y, dirty, moved = 0, [], False
        for a, b in zip(old, paras):
            new = self._strips(b, width, style)
            if a != b:
                moved |= len(new) != len(self._strips(a, width, style))
                dirty.append(Region(0, y, width, len(new)))
            y += len(new)
        if moved:                       # lines moved up or down inside: repaint it all
            self.refresh()
        elif dirty:
            self.refresh(*dirty)

    @property
    def _auto_height(self) -> bool:
        # Only a widget whose height follows its text needs a new layout when the
        # text grows or shrinks (fixed heights are set in tui.app's CSS).
        return self.styles.height is None or self.styles.height.is_auto

    def _strips(self, para: Text, width: int, style) -> list[Strip]:
        key = (width, style, para.plain, tuple(para.spans), para.style)
        strips = self._known.pop(key, None)
        if strips is None:
            visual = visualize(self, para, markup=False)
            strips = Visual.to_strips(self, visual, width, None, style) or [Strip.blank(0)]
            while len(self._known) > len(self._paras) + self.KEEP:
                del self._known[next(iter(self._known))]        # the least recently used
        self._known[key] = strips
        return strips

    def get_content_height(self, container, viewport, width: int) -> int:
        # Asked at other widths too (a scrollbar comes or goes): the cache keys on the width.
        style = self.visual_style
        return sum(len(self._strips(p, width, style)) for p in self._paras)

    def render_line(self, y: int) -> Strip:
        width, style = self.size.width, self.visual_style
        if self._flat is None or self._flat_shape != (width, style):
            self._flat = [s for p in self._paras for s in self._strips(p, width, style)]
            self._flat_shape = (width, style)
        if y >= len(self._flat):
            return Strip.blank(width, style.rich_style)
        # Each paragraph was rendered on its own (line 0): give its cells their place
        # in the whole text, as a Static's do, for Textual's mouse text selection.
        return self._flat[y].apply_offsets(0, y)

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._known.clear()             # a theme change: the colours differ
        self._flat = None
