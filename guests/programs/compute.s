; compute: a compute loop over a 4 KiB buffer (the benchmark's workload:
; a load, an add and a store per iteration, like ordinary code; the same
; bytes run on bare Unicorn in minivmm/bench.py).
;   args[0] = iterations (0 = 1000000); each iteration is 7 instructions.
;   args[1] = 1 to ask for protection first (needs 1 data page).
; Prints "compute: done <checksum>" and exits 0.
;
; The buffer comes first, so it fills the image's first page alone: stores
; into a page that also holds translated code make QEMU throw that code away
; (self-modifying-code detection), which made this loop 3x slower the day a
; few bytes of code moved in front of it.  (keystone's .align emits nothing.)
buf:     .space 4096, 0
_start:
    mov eax, 1
    call ulib_protect_if
    xor eax, eax
    call ulib_arg
    test eax, eax
    jnz have_n
    mov eax, 1000000
have_n:
    mov edx, eax
    xor eax, eax
    xor edi, edi
    mov ebp, buf
spin:                              ; bench-loop-begin (minivmm/bench.py runs these lines bare)
    mov ebx, [ebp+edi]
    add eax, ebx
    mov [ebp+edi], eax
    add edi, 4
    and edi, 0xffc
    dec edx
    jnz spin                        ; bench-loop-end
    mov [sum], eax
    mov esi, msg
    call ulib_puts
    mov eax, [sum]
    call ulib_putdec
    mov esi, newline
    call ulib_puts
    xor eax, eax
    call ulib_exit
msg:     .asciz "compute: done "
newline: .asciz "\n"
sum:     .long 0
.include "_ulib.s"
