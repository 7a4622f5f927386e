; oracle: a protected victim whose page accesses depend on its secret byte:
; the target of the attack lab's controlled-channel kernel (hostile_channel.s).
; Needs 4 data pages: DATA_VADDR (shared), ONE, ZERO, NEXT.  For each bit of
; SECRET, most significant first, it touches NEXT, then ONE for a 1 bit or
; ZERO for a 0 bit -- the kind of secret-dependent access a table lookup or a
; branch on a key makes.  Cloaking hides what the pages hold, not which ones
; it touches.  It keeps the byte to itself; protected, nobody else can read
; it.  Exits 0.
.equ ONE_PAGE, 0x40801000
.equ ZERO_PAGE, 0x40802000
.equ NEXT_PAGE, 0x40803000

_start:
    call ulib_protect
    mov eax, SYS_YIELD              ; a kernel entry before the secret work starts
    int 0x80
    movzx ebx, byte ptr [secret]
    mov ecx, 8
or_bit:
    mov eax, [NEXT_PAGE]
    test ebx, 0x80
    jz or_zero
    mov eax, [ONE_PAGE]
    jmp or_next
or_zero:
    mov eax, [ZERO_PAGE]
or_next:
    shl ebx, 1
    dec ecx
    jnz or_bit
    mov esi, msg_done
    call ulib_puts
    xor eax, eax
    call ulib_exit

secret:   .byte 0xA7
msg_done: .asciz "oracle: done\n"
.include "_ulib.s"
