; sysloop: a system-call-heavy loop (the protection benchmark's workload).
;   args[0] = iterations (getpid calls), args[1] = 1 to ask for protection
;   first (needs 1 data page).  Prints "sysloop: done" and exits 0.
_start:
    mov eax, 1
    call ulib_protect_if
    xor eax, eax
    call ulib_arg
    mov edi, eax
again:
    mov eax, SYS_GETPID
    int 0x80
    dec edi
    jnz again
    mov esi, msg
    call ulib_puts
    xor eax, eax
    call ulib_exit
msg: .asciz "sysloop: done\n"
.include "_ulib.s"
