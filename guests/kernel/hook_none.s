; The honest kernel's system-call hook: does nothing.
syscall_hook:
    ret
