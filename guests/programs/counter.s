; counter: prints "counter N" for N = 1, 2, 3, ... (continuity is guest-visible)
;   args[0] = how many lines (0 = forever), args[1] = busy-loop iterations
;   between lines (0 = 20000), args[2] = 1 to ask for protection first (needs
;   one data page for the shared page; the output is the same either way).
;   Exits 0 after the last line.
_start:
    mov eax, 2
    call ulib_protect_if
    mov eax, 0
    call ulib_arg
    mov [limit], eax
    mov eax, 1
    call ulib_arg
    test eax, eax
    jnz have_delay
    mov eax, 20000
have_delay:
    mov [delay], eax
    mov dword ptr [n], 0
next:
    inc dword ptr [n]
    mov esi, prefix
    call ulib_puts
    mov eax, [n]
    call ulib_putdec
    mov esi, newline
    call ulib_puts
    mov eax, [limit]
    test eax, eax
    jz spin
    cmp [n], eax
    jae done
spin:
    mov ecx, [delay]
spin_loop:
    dec ecx
    jnz spin_loop
    jmp next
done:
    xor eax, eax
    call ulib_exit

prefix:  .asciz "counter "
newline: .asciz "\n"
n:       .long 0
limit:   .long 0
delay:   .long 0
.include "_ulib.s"
