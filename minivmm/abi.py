"""The guest ABI: every number a guest and the VMM must agree on.

This module is the single source of truth.  The guest build step turns these
constants into ``.equ`` lines that every assembly source sees (see
``guests/asm.py``), and ``docs/guest-abi.md`` documents them for test authors.
Changing a value here changes the ABI: bump ``ABI_VERSION``.
"""

ABI_VERSION = 1

# --- I/O ports (only CPL0 may use them: Unicorn checks neither IOPL nor the
# I/O bitmap, so the VMM checks SS & 3 itself and injects #GP otherwise).
PORT_CONSOLE = 0xE9        # out: one byte of console output (Bochs' debug port)
PORT_CONSOLE_CHANNEL = 0xEA  # out: pid whose output follows (0 = kernel)

# --- Interrupt vectors.
VEC_DE, VEC_DB, VEC_BP, VEC_OF = 0, 1, 3, 4
VEC_UD, VEC_DF, VEC_GP, VEC_PF = 6, 8, 13, 14
VEC_TIMER = 0x20           # injected by the VMM's timer
VEC_SYSCALL = 0x80         # int 0x80: system calls, delivered to the guest kernel
VEC_HYPERCALL = 0x82       # int 0x82: hypercalls, handled by the VMM, never delivered

# Exceptions that push an error code (Intel SDM vol. 3, table 6-1).
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17})

# --- System calls (int 0x80): eax = number, ebx/ecx/edx = arguments, eax = result.
SYS_EXIT = 1     # exit(status)            never returns
SYS_WRITE = 2    # write(buf, len) -> len  console output, len <= 4096
SYS_YIELD = 3    # yield() -> 0
SYS_GETPID = 4   # getpid() -> pid
SYS_SLEEP = 5    # sleep(ticks) -> 0
SYS_TICKS = 6    # ticks() -> timer ticks since boot

# Error results (negative, Linux-like numbers).
EFAULT = 14
EINVAL = 22
ENOSYS = 38
EPERM = 1
EEXIST = 17
E2BIG = 7       # HC_PROTECT: more pages mapped than one hypercall may protect

# --- Hypercalls (int 0x82): eax = number, ebx/ecx/edx = arguments, eax = result.
HC_VERSION = 0x01        # any ring  -> ABI_VERSION
HC_SHUTDOWN = 0x10       # kernel    ebx = status: power off, ends the run cleanly
HC_PANIC = 0x11          # kernel    ebx = vector, ecx = eip: the kernel gave up
HC_PROC_START = 0x12     # kernel    ebx = pid, ecx = cr3, edx = name (kernel vaddr)
HC_PROC_EXIT = 0x13      # kernel    ebx = pid, ecx = status
HC_PROTECT = 0x20        # user      reserved for process protection (cloaking)
HC_TRUSTED_WRITE = 0x21  # user      ebx = buffer, ecx = length: output the kernel cannot forge or drop
TRUSTED_WRITE_MAX = 256  # bytes per HC_TRUSTED_WRITE

# --- Memory layout (virtual addresses seen by every process).
PAGE_SIZE = 0x1000
KERNEL_BASE = 0x00100000     # kernel image, identity mapped, supervisor only
KERNEL_MAP_SIZE = 16 << 20   # [0, 16 MiB) identity mapped in every address space
USER_BASE = 0x40000000       # first user address
USER_END = 0x80000000        # one past the last user address
INFO_VADDR = 0x40000000      # process info page (read-only)
IMAGE_VADDR = 0x40001000     # program image (code + data, read/write)
DATA_VADDR = 0x40800000      # data region (read/write, size set per program)
STACK_PAGES = 4
STACK_TOP = USER_END         # initial esp
BOOT_GDT_PADDR = 0x7000      # the loader's flat boot GDT (like a multiboot loader's)

# Process info page layout (offsets into INFO_VADDR).
INFO_PID = 0
INFO_DATA_BASE = 4
INFO_DATA_PAGES = 8
INFO_NARGS = 12
INFO_ARGS = 16               # up to MAX_ARGS u32 arguments
INFO_NAME = 64               # NUL-terminated, up to 15 chars
MAX_ARGS = 8
# The same fields as absolute addresses (keystone mis-assembles [A + B]).
INFO_PID_ADDR = INFO_VADDR + INFO_PID
INFO_DATA_BASE_ADDR = INFO_VADDR + INFO_DATA_BASE
INFO_DATA_PAGES_ADDR = INFO_VADDR + INFO_DATA_PAGES
INFO_NARGS_ADDR = INFO_VADDR + INFO_NARGS
INFO_ARGS_ADDR = INFO_VADDR + INFO_ARGS
INFO_NAME_ADDR = INFO_VADDR + INFO_NAME

# Kernel process table (guest-visible; read by minivmm.guestview).
NPROC = 16
PROC_SIZE = 128
PROC_STATE, PROC_PID, PROC_CR3, PROC_WAKE, PROC_EXIT = 0, 4, 8, 12, 16
PROC_FRAME = 20              # 15 u32: edi esi ebp esp0 ebx edx ecx eax vec err eip cs eflags esp ss
FRAME_EDI, FRAME_ESI, FRAME_EBP, FRAME_ESP0, FRAME_EBX = 0, 4, 8, 12, 16
FRAME_EDX, FRAME_ECX, FRAME_EAX, FRAME_VEC, FRAME_ERR = 20, 24, 28, 32, 36
FRAME_EIP, FRAME_CS, FRAME_EFLAGS, FRAME_ESP, FRAME_SS = 40, 44, 48, 52, 56
FRAME_WORDS = 15
# PROC_FRAME + FRAME_x, precomputed: keystone drops all but the last symbol
# in a memory operand like [esi+PROC_FRAME+FRAME_EAX].
PF_EAX, PF_EBX, PF_ECX, PF_EDX = (20 + 28, 20 + 16, 20 + 24, 20 + 20)
PROC_NAME = 80               # 16 bytes
PROC_FAULT_VEC, PROC_FAULT_ADDR, PROC_FAULT_EIP = 96, 100, 104
P_UNUSED, P_RUNNABLE, P_SLEEPING, P_EXITED, P_KILLED = 0, 1, 2, 3, 4
PROC_STATE_NAMES = {P_UNUSED: "unused", P_RUNNABLE: "runnable",
                    P_SLEEPING: "sleeping", P_EXITED: "exited", P_KILLED: "killed"}

# GDT selectors of the toy kernel.
SEL_KCODE, SEL_KDATA, SEL_UCODE, SEL_UDATA, SEL_TSS = 0x08, 0x10, 0x1B, 0x23, 0x28


def asm_prelude() -> str:
    """``.equ`` lines for every public constant above, for guest sources."""
    lines = []
    # A copy first (one C call, atomic under the GIL): another thread may add a
    # module global meanwhile (a warning's __warningregistry__), and iterating
    # the live dict then raises "dictionary changed size" (seen under load).
    for name, value in sorted(dict(globals()).items()):
        if name.isupper() and isinstance(value, int):
            lines.append(f".equ {name}, {value:#x}")
    return "\n".join(lines)
