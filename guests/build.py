"""The image builder: a tiny linker for the toy kernel and its processes.

It assembles the kernel at ``KERNEL_BASE`` and each program at
``IMAGE_VADDR``, lays out physical memory page by page, builds one page
directory per process (the kernel's identity map shared, supervisor-only),
fills the kernel's process table, and returns a :class:`GuestImage`.

Physical layout (every piece page-aligned, padded explicitly)::

    0x00007000  boot GDT (written by the VMM's loader at boot)
    0x00100000  kernel image (code, data, IDT, process table, kernel stack)
    ...         kernel page tables: identity map of [0, KERNEL_MAP_SIZE)
    ...         kernel-only page directory
    ...         per process: page directory, page tables, info page,
                image pages, data pages, stack pages
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from minivmm import abi
from minivmm.image import GuestImage, ImageProcess
from guests.asm import assemble

GUESTS_DIR = Path(__file__).resolve().parent
KERNEL_DIR = GUESTS_DIR / "kernel"
PROGRAMS_DIR = GUESTS_DIR / "programs"

PTE_P, PTE_W, PTE_U = 1, 2, 4
PAGE = abi.PAGE_SIZE


class BuildError(Exception):
    """The image cannot be built as asked (too big, too many processes, ...)."""


@dataclass(frozen=True)
class Program:
    """A user program: assembly source plus what its process gets.

    ``data_pages`` zero-filled pages are mapped read/write at ``DATA_VADDR``;
    ``args`` (at most ``MAX_ARGS`` u32) appear in the process info page.
    """

    name: str
    source: str
    filename: str = "<program>"
    data_pages: int = 0
    args: tuple[int, ...] = ()

    @classmethod
    def builtin(cls, name: str, *, data_pages: int | None = None,
                args: tuple[int, ...] = (), as_name: str | None = None) -> "Program":
        path = PROGRAMS_DIR / f"{name}.s"
        if not path.is_file():
            raise BuildError(f"no built-in program {name!r} (have: {', '.join(builtin_programs())})")
        pages = DEFAULT_DATA_PAGES.get(name, 0) if data_pages is None else data_pages
        return cls(as_name or name, load_source(path), str(path.relative_to(GUESTS_DIR.parent)),
                   pages, tuple(args))

    def with_args(self, *args: int) -> "Program":
        return Program(self.name, self.source, self.filename, self.data_pages, tuple(args))


DEFAULT_DATA_PAGES = {"dirtier": 64, "memcheck": 64, "oracle": 4}


def builtin_programs() -> list[str]:
    return sorted(p.stem for p in PROGRAMS_DIR.glob("*.s") if not p.stem.startswith("_"))


def load_source(path: Path) -> str:
    """Read an assembly file, expanding ``.include "file"`` (relative to it)."""
    return expand_includes(path.read_text(), path.parent)


def expand_includes(source: str, directory: Path, depth: int = 0, fallback: Path | None = None) -> str:
    """Expand ``.include "file"`` lines; inline sources include from guests/programs/.
    ``fallback``: a second directory to look in (a user's program in its own
    folder still finds ``_ulib.s``)."""
    if depth > 8:
        raise BuildError(".include nested more than 8 deep")
    out = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith(".include"):
            name = stripped.split(None, 1)[1].strip().strip('"')
            target = directory / name
            if not target.is_file() and fallback is not None and (fallback / name).is_file():
                target = fallback / name
            if not target.is_file():
                raise BuildError(f".include: no file {target}")
            out.append(expand_includes(target.read_text(), target.parent, depth + 1, fallback))
        else:
            out.append(line)
    return "\n".join(out)


@dataclass
class _Phys:
    """Physical memory under construction: a page allocator plus contents."""

    ram_size: int
    pages: dict[int, bytearray] = field(default_factory=dict)
    next_free: int = 0

    def alloc(self, count: int = 1) -> int:
        addr = self.next_free
        self.next_free += count * PAGE
        if self.next_free > self.ram_size:
            raise BuildError(f"image needs more than {self.ram_size >> 20} MiB of guest RAM")
        return addr

    def write(self, paddr: int, data: bytes) -> None:
        for off in range(0, len(data), PAGE):
            chunk = data[off:off + PAGE]
            page = self.pages.setdefault((paddr + off) & ~(PAGE - 1), bytearray(PAGE))
            start = (paddr + off) % PAGE
            assert start == 0, "writes are page-aligned"
            page[:len(chunk)] = chunk

    def u32(self, paddr: int, value: int) -> None:
        page = self.pages.setdefault(paddr & ~(PAGE - 1), bytearray(PAGE))
        struct.pack_into("<I", page, paddr % PAGE, value & 0xFFFFFFFF)


class _AddressSpace:
    """One page directory; maps pages by allocating page tables on demand."""

    def __init__(self, phys: _Phys, kernel_pts: list[int]):
        self.phys = phys
        self.pd = phys.alloc()
        self.pts: dict[int, int] = {}
        for i, pt in enumerate(kernel_pts):          # the kernel half: shared, supervisor
            phys.u32(self.pd + 4 * i, pt | PTE_P | PTE_W)

    def map(self, vaddr: int, paddr: int, flags: int) -> None:
        pdi, pti = vaddr >> 22, (vaddr >> 12) & 0x3FF
        if pdi not in self.pts:
            self.pts[pdi] = self.phys.alloc()
            self.phys.u32(self.pd + 4 * pdi, self.pts[pdi] | PTE_P | PTE_W | PTE_U)
        self.phys.u32(self.pts[pdi] + 4 * pti, paddr | flags)


HOSTILE_KERNELS = ("snoop", "tamper", "regs", "swap", "channel")
_HOOK_INCLUDE = '.include "hook_none.s"'


def kernel_text(variant: str = "honest") -> str:
    """The toy kernel's source: ``"honest"``, or a hostile kernel of the attack
    lab (one of HOSTILE_KERNELS), which swaps the system-call hook for its attack."""
    text = (KERNEL_DIR / "kernel.s").read_text()
    if variant != "honest":
        if variant not in HOSTILE_KERNELS:
            raise BuildError(f"no kernel {variant!r}; try honest or one of {', '.join(HOSTILE_KERNELS)}")
        if _HOOK_INCLUDE not in text:
            raise BuildError(f"kernel.s lacks the line {_HOOK_INCLUDE}")
        text = text.replace(_HOOK_INCLUDE, f'.include "hostile_{variant}.s"')
    return text


def build_image(programs: list[Program], *, name: str = "custom",
                ram_size: int = 16 << 20, kernel_source: str | None = None,
                kernel_filename: str = "guests/kernel/kernel.s",
                description: str = "", kernel: str = "honest") -> GuestImage:
    """Build a bootable image of the toy kernel plus ``programs`` (pids 1..n).

    ``kernel`` picks the honest kernel or a hostile one (``HOSTILE_KERNELS``);
    ``kernel_source`` replaces it with your own text (``.include`` resolves
    in guests/kernel/)."""
    if not 1 <= len(programs) <= abi.NPROC:
        raise BuildError(f"an image holds 1 to {abi.NPROC} programs, not {len(programs)}")
    if kernel_source is None:
        kernel_source = kernel_text(kernel)
        if kernel != "honest":
            kernel_filename = f"guests/kernel/kernel.s+hostile_{kernel}.s"
    kernel = assemble(expand_includes(kernel_source, KERNEL_DIR), abi.KERNEL_BASE, kernel_filename)
    for sym in ("kernel_entry", "proc_table", "boot_kernel_pd", "kstack_top"):
        if sym not in kernel.symbols:
            raise BuildError(f"{kernel_filename}: kernel lacks the symbol {sym!r}")

    phys = _Phys(ram_size, next_free=abi.KERNEL_BASE)
    kpages = (len(kernel.code) + PAGE - 1) // PAGE
    kbase = phys.alloc(kpages)
    kimage = bytearray(kernel.code)

    # The kernel's identity map of low memory, shared by every address space.
    # Page 0 stays unmapped so that null pointers fault.
    nkpt = abi.KERNEL_MAP_SIZE >> 22
    kernel_pts = [phys.alloc() for _ in range(nkpt)]
    for i, pt in enumerate(kernel_pts):
        for j in range(1024):
            paddr = (i << 22) | (j << 12)
            if paddr:
                phys.u32(pt + 4 * j, paddr | PTE_P | PTE_W)
    kspace = _AddressSpace(phys, kernel_pts)

    processes = []
    table = bytearray(abi.NPROC * abi.PROC_SIZE)
    for index, prog in enumerate(programs):
        pid = index + 1
        if len(prog.args) > abi.MAX_ARGS:
            raise BuildError(f"{prog.name}: at most {abi.MAX_ARGS} args")
        if not prog.name or len(prog.name.encode()) > 15:
            raise BuildError(f"program name {prog.name!r} must be 1..15 bytes")
        code = assemble(expand_includes(prog.source, PROGRAMS_DIR), abi.IMAGE_VADDR, prog.filename)
        if not code.code:
            raise BuildError(f"{prog.filename}: program is empty")
        if len(code.code) > abi.DATA_VADDR - abi.IMAGE_VADDR:
            raise BuildError(f"{prog.filename}: image larger than {(abi.DATA_VADDR - abi.IMAGE_VADDR) >> 10} KiB")
        space = _AddressSpace(phys, kernel_pts)
        info = phys.alloc()
        space.map(abi.INFO_VADDR, info, PTE_P | PTE_U)            # read-only
        info_page = bytearray(PAGE)
        struct.pack_into("<IIII", info_page, 0, pid, abi.DATA_VADDR, prog.data_pages, len(prog.args))
        struct.pack_into(f"<{len(prog.args)}I", info_page, abi.INFO_ARGS, *[a & 0xFFFFFFFF for a in prog.args])
        info_page[abi.INFO_NAME:abi.INFO_NAME + len(prog.name)] = prog.name.encode()
        phys.write(info, bytes(info_page))
        npages = (len(code.code) + PAGE - 1) // PAGE
        img = phys.alloc(npages)
        phys.write(img, code.code)
        for i in range(npages):
            space.map(abi.IMAGE_VADDR + i * PAGE, img + i * PAGE, PTE_P | PTE_W | PTE_U)
        data = phys.alloc(prog.data_pages) if prog.data_pages else 0
        for i in range(prog.data_pages):
            space.map(abi.DATA_VADDR + i * PAGE, data + i * PAGE, PTE_P | PTE_W | PTE_U)
        stack = phys.alloc(abi.STACK_PAGES)
        for i in range(abi.STACK_PAGES):
            space.map(abi.STACK_TOP - (abi.STACK_PAGES - i) * PAGE, stack + i * PAGE,
                      PTE_P | PTE_W | PTE_U)
        entry = code.symbols.get("_start", abi.IMAGE_VADDR)

        slot = index * abi.PROC_SIZE
        frame = [0] * abi.FRAME_WORDS
        frame[abi.FRAME_EIP // 4] = entry
        frame[abi.FRAME_CS // 4] = abi.SEL_UCODE
        frame[abi.FRAME_EFLAGS // 4] = 0x202           # IF set: user mode is preemptible
        frame[abi.FRAME_ESP // 4] = abi.STACK_TOP
        frame[abi.FRAME_SS // 4] = abi.SEL_UDATA
        struct.pack_into("<5I", table, slot, abi.P_RUNNABLE, pid, space.pd, 0, 0)
        struct.pack_into(f"<{abi.FRAME_WORDS}I", table, slot + abi.PROC_FRAME, *frame)
        table[slot + abi.PROC_NAME:slot + abi.PROC_NAME + len(prog.name)] = prog.name.encode()
        processes.append(ImageProcess(pid=pid, name=prog.name, cr3=space.pd, entry=entry,
                                      data_pages=prog.data_pages, args=tuple(prog.args),
                                      symbols=code.symbols))

    def patch(sym: str, data: bytes) -> None:
        off = kernel.symbols[sym] - abi.KERNEL_BASE
        kimage[off:off + len(data)] = data

    patch("proc_table", bytes(table))
    patch("boot_kernel_pd", struct.pack("<I", kspace.pd))
    phys.write(kbase, bytes(kimage))

    segments = _segments(phys)
    return GuestImage(name=name, entry=kernel.symbols["kernel_entry"],
                      boot_esp=kernel.symbols["kstack_top"], min_ram=phys.next_free,
                      segments=segments, kernel_symbols=kernel.symbols,
                      processes=processes, description=description)


def _segments(phys: _Phys) -> list[tuple[int, bytes]]:
    """Contiguous runs of non-zero pages (zero pages need no bytes in the image)."""
    out: list[tuple[int, bytearray]] = []
    for addr in sorted(phys.pages):
        page = phys.pages[addr]
        if not any(page):
            continue
        if out and out[-1][0] + len(out[-1][1]) == addr:
            out[-1][1].extend(page)
        else:
            out.append((addr, bytearray(page)))
    return [(a, bytes(d)) for a, d in out]


def program_image(path: Path, *, data_pages: int = 1, args: tuple[int, ...] = (),
                  ram_size: int = 16 << 20) -> GuestImage:
    """``minivmm asm FILE.s`` / ``minivmm run FILE.s``: one user program
    (pid 1, named after the file) linked with the honest toy kernel.
    ``.include`` looks beside the file first, then in guests/programs/.
    Assembler errors name the file and line (``AsmError``); an include placed
    at the end (as docs/guest-abi.md asks) keeps the lines of the file itself."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise BuildError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise BuildError(f"{path}: not a text file") from None
    source = expand_includes(text, path.parent, fallback=PROGRAMS_DIR)
    name = path.stem[:15] or "program"
    return build_image([Program(name, source, str(path), data_pages, tuple(args))],
                       name=name, ram_size=ram_size, description=f"{path.name} with the toy kernel")
