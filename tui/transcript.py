"""Transcripts: a session's frames, saved to replay later without a VMM.

Format (version 2), UTF-8 JSON lines, one JSON object per line:

1. header:  ``{"format": "minivmm-tui-transcript", "version": 2, "scenario": {...}}``
2. frames:  ``{"frame": {...}}`` -- a :class:`tui.model.Frame` as its fields;
   ``source`` / ``destination`` are ``null`` when that host's view is the same
   as in the previous frame (views are the bulk of a frame); a memory map is
   ``{"npages", "per_cell", "runs"}``, its cells run-length coded as
   ``<content><transfer><count>`` repeated (``"f-4000k-12u-84"``);
3. trailer: ``{"end": {"frames": N}}`` -- a file without it was cut short.

Version 1 (before zoom and record bodies) is still read: maps as ``cells``
(two characters per cell), no message ``body``, no frame ``updated``.

Bounds, checked before parsing: a line is at most ``MAX_LINE`` bytes, a
file at most ``MAX_FRAMES`` frames.  Every object is checked field by
field (names, types); anything else is a :class:`TranscriptError` that says
which line and why.  docs/tui.md describes the fields.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import asdict, fields

import numpy as np

from tui import phases
from tui.model import Frame, HostView, MemoryMap, Message, Proc, RoundPoint, Stats

FORMAT = "minivmm-tui-transcript"
VERSION = 2
READS = (1, 2)
MAX_LINE = 1 << 20
MAX_RUNS_TEXT = 192 << 10       # a map's runs per frame line; past it the writer merges cells
_RUN = re.compile(r"([fkupc][-~sd])([1-9][0-9]{0,8})")
MAX_FRAMES = 100_000


class TranscriptError(ValueError):
    pass


class Writer:
    """Append frames as they come (from any thread); ``close()`` writes the trailer."""

    def __init__(self, path, scenario: dict):
        self._f = open(path, "w", encoding="utf-8")
        self._lock = threading.Lock()
        self._last = {"source": None, "destination": None}
        self.frames = 0
        self._line({"format": FORMAT, "version": VERSION, "scenario": scenario})

    def _line(self, obj) -> None:
        text = json.dumps(obj, separators=(",", ":"), sort_keys=True)
        if len(text.encode()) > MAX_LINE:
            raise TranscriptError(f"a transcript line would exceed {MAX_LINE} bytes")
        self._f.write(text + "\n")

    def write(self, frame: Frame) -> None:
        with self._lock:
            if self._f.closed or self.frames >= MAX_FRAMES:
                return
            d = asdict(frame)
            for side in ("source", "destination"):
                view = getattr(frame, side)
                if view == self._last[side]:
                    d[side] = None
                elif view.memory is not None:
                    d[side]["memory"] = encode_map(view.memory)
                self._last[side] = view
            self._line({"frame": d})
            self.frames += 1

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._line({"end": {"frames": self.frames}})
                self._f.close()


def runs(m: MemoryMap) -> str:
    """The cells run-length coded; vectorised (a 256 MiB map is 65536 cells a frame)."""
    if not m.ncells:
        return ""
    cells = np.frombuffer(m.cells.encode("ascii"), np.uint16)      # one value per two-character cell
    starts = np.concatenate(([0], np.flatnonzero(cells[1:] != cells[:-1]) + 1))
    counts = np.diff(np.append(starts, len(cells)))
    return "".join(f"{m.cells[2 * a:2 * a + 2]}{n}" for a, n in zip(starts.tolist(), counts.tolist()))


def encode_map(m: MemoryMap) -> dict:
    """A map as its runs; a map too varied for a line is merged (coarser) until it fits."""
    text = runs(m)
    while len(text) > MAX_RUNS_TEXT:
        m = m.regroup(m.ncells // 2)
        text = runs(m)
    return {"npages": m.npages, "per_cell": m.per_cell, "runs": text}


def decode_runs(text: str, where: str) -> str:
    cells, pos = [], 0
    for r in _RUN.finditer(text):
        if r.start() != pos:
            break
        cells.append(r.group(1) * int(r.group(2)))
        pos = r.end()
    if pos != len(text):
        raise TranscriptError(f"{where}: a malformed memory map (runs at character {pos})")
    return "".join(cells)


# ---------------------------------------------------------------- reading
def _build(cls, d, where: str):
    if not isinstance(d, dict):
        raise TranscriptError(f"{where}: expected an object for {cls.__name__}")
    names = [f.name for f in fields(cls)]
    if set(d) != set(names):
        raise TranscriptError(f"{where}: {cls.__name__} fields {sorted(d)}, expected {sorted(names)}")
    return {n: d[n] for n in names}


def _int(v, where, *, none=False):
    if (v is None and none) or (isinstance(v, int) and not isinstance(v, bool)):
        return v
    raise TranscriptError(f"{where}: expected an integer, got {type(v).__name__}")


def _str(v, where):
    if isinstance(v, str):
        return v
    raise TranscriptError(f"{where}: expected a string, got {type(v).__name__}")


def _num(v, where, *, none=False):
    if (v is None and none) or (isinstance(v, (int, float)) and not isinstance(v, bool)):
        return v
    raise TranscriptError(f"{where}: expected a number, got {type(v).__name__}")


def _list(v, where):
    if isinstance(v, list):
        return v
    raise TranscriptError(f"{where}: expected a list, got {type(v).__name__}")


def _memory(d, w, version: int) -> MemoryMap | None:
    if d is None:
        return None
    if version == 1:
        f = _build(MemoryMap, d, w)
        cells = _str(f["cells"], w)
    else:
        if not isinstance(d, dict) or set(d) != {"npages", "per_cell", "runs"}:
            raise TranscriptError(f"{w}: a memory map is {{npages, per_cell, runs}}")
        f = d
        npages, per = _int(f["npages"], w), _int(f["per_cell"], w)
        text = _str(f["runs"], w)
        # Bounded before expanding: a count may not exceed the map's own cells.
        if per < 1 or not 0 <= npages <= (1 << 20) or len(text) > MAX_LINE:
            raise TranscriptError(f"{w}: a malformed memory map")
        if sum(int(x) for x in re.findall(r"[0-9]+", text)) != -(-npages // per):
            raise TranscriptError(f"{w}: a memory map whose runs do not cover its {npages} pages")
        cells = decode_runs(text, w)
    m = MemoryMap(_int(f["npages"], w), _int(f["per_cell"], w), cells)
    if len(m.cells) % 2 or m.per_cell < 1 or m.npages < 0 or m.ncells != -(-m.npages // m.per_cell) \
            or not set(m.cells[0::2]) <= set("fkupc") or not set(m.cells[1::2]) <= set("-~sd"):
        raise TranscriptError(f"{w}: a malformed memory map")
    return m


def _host(d, w, version: int) -> HostView:
    f = _build(HostView, d, w)
    regs = []
    for r in _list(f["registers"], w):
        if not (isinstance(r, list) and len(r) == 2):
            raise TranscriptError(f"{w}: a register is [name, value]")
        regs.append((_str(r[0], w), _int(r[1], w)))
    procs = tuple(Proc(**{k: (_int(v, w) if k == "pid" else _str(v, w))
                          for k, v in _build(Proc, p, w).items()}) for p in _list(f["processes"], w))
    return HostView(_str(f["role"], w), _str(f["status"], w), _int(f["vclock"], w), _memory(f["memory"], w, version),
                    tuple(regs), tuple(_str(x, w) for x in _list(f["disasm"], w)), procs,
                    tuple(_str(x, w) for x in _list(f["console"], w)))


def _message(d, w, version: int) -> Message | None:
    if d is None:
        return None
    if version == 1 and isinstance(d, dict):
        d = {**d, "body": []}
    f = _build(Message, d, w)
    body = []
    for kv in _list(f["body"], w):
        if not (isinstance(kv, list) and len(kv) == 2):
            raise TranscriptError(f"{w}: a body field is [name, value]")
        body.append((_str(kv[0], w), _str(kv[1], w)))
    return Message(_int(f["n"], w), _str(f["side"], w), _str(f["direction"], w), _str(f["rtype"], w),
                   _int(f["length"], w), _int(f["seq"], w), _str(f["verdict"], w), tuple(body))


def _stats(d, w) -> Stats:
    f = _build(Stats, d, w)
    pts = tuple(RoundPoint(*(_int(v, w) for v in _build(RoundPoint, p, w).values())) for p in _list(f["rounds"], w))
    return Stats(_int(f["round"], w, none=True), _int(f["pages_sent"], w), _int(f["data_pages"], w),
                 _int(f["zero_pages"], w), _int(f["bytes"], w), _num(f["dirty_rate"], w),
                 _num(f["downtime_ms"], w, none=True), pts)


def _frame(d, w, prev: Frame | None, version: int) -> Frame:
    if version == 1 and isinstance(d, dict):
        d = {**d, "updated": []}
    f = _build(Frame, d, w)
    views = {}
    for side in ("source", "destination"):
        if f[side] is None:
            if prev is None:
                raise TranscriptError(f"{w}: the first frame must carry both hosts' views")
            views[side] = getattr(prev, side)
        else:
            views[side] = _host(f[side], f"{w}, {side}", version)
    phase = _str(f["phase"], w)
    if phase not in phases.PHASES:
        raise TranscriptError(f"{w}: unknown phase {phase!r}")
    return Frame(_int(f["index"], w), phase, _int(f["round"], w, none=True), _str(f["mode"], w),
                 _str(f["note"], w), _message(f["message"], w, version), views["source"], views["destination"],
                 _stats(f["stats"], w),
                 tuple(_message(m, f"{w}, updated", version) for m in _list(f["updated"], w) if m is not None))


def read(path) -> tuple[dict, list[Frame]]:
    """(scenario, frames) of a transcript file; :class:`TranscriptError` if it is not a whole one."""
    frames: list[Frame] = []
    header = None
    ended = False
    with open(path, "rb") as fh:
        lineno = 0
        while True:
            raw = fh.readline(MAX_LINE + 1)
            if not raw:
                break
            lineno += 1
            w = f"{path}, line {lineno}"
            if len(raw) > MAX_LINE:
                raise TranscriptError(f"{w}: longer than {MAX_LINE} bytes")
            if not raw.endswith(b"\n"):
                raise TranscriptError(f"{w}: truncated (the last line has no end)")
            if ended:
                raise TranscriptError(f"{w}: data after the end record")
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise TranscriptError(f"{w}: not JSON ({exc})") from None
            if not isinstance(obj, dict) or len(obj) == 0:
                raise TranscriptError(f"{w}: expected a JSON object")
            if header is None:
                if obj.get("format") != FORMAT:
                    raise TranscriptError(f"{w}: not a minivmm TUI transcript (no \"format\": \"{FORMAT}\" header)")
                if obj.get("version") not in READS:
                    raise TranscriptError(f"{w}: transcript version {obj.get('version')!r}, this minivmm reads "
                                          f"versions {', '.join(map(str, READS))}")
                if not isinstance(obj.get("scenario"), dict):
                    raise TranscriptError(f"{w}: the header has no scenario")
                header = obj
            elif set(obj) == {"frame"}:
                if len(frames) >= MAX_FRAMES:
                    raise TranscriptError(f"{w}: more than {MAX_FRAMES} frames")
                fr = _frame(obj["frame"], w, frames[-1] if frames else None, header["version"])
                if fr.index != len(frames):
                    raise TranscriptError(f"{w}: frame index {fr.index}, expected {len(frames)}")
                frames.append(fr)
            elif set(obj) == {"end"}:
                end = obj["end"]
                if not isinstance(end, dict) or end.get("frames") != len(frames):
                    raise TranscriptError(f"{w}: the end record counts {end!r} frames, the file has {len(frames)}")
                ended = True
            else:
                raise TranscriptError(f"{w}: unknown record {sorted(obj)}")
    if header is None:
        raise TranscriptError(f"{path}: empty, not a transcript")
    if not ended:
        raise TranscriptError(f"{path}: truncated: no end record after {len(frames)} frames "
                              f"(the recording was cut short)")
    if not frames:
        raise TranscriptError(f"{path}: a transcript without frames")
    return header["scenario"], frames
