; Hostile kernel 1: SNOOP.  Reads the victim's secret page and prints it
; (printable bytes as is, the rest as '.').  Unprotected it prints the
; secret; protected, the VMM cloaks the page at the kernel's first touch and
; it prints ciphertext, while the victim goes on unharmed.
.include "hostile_common.s"

attack:
    mov esi, msg_snoop
    call puts
    mov ebx, HK_SECRET_PAGE
    mov ecx, 32
    mov dx, PORT_CONSOLE
snoop_loop:
    mov al, [ebx]
    cmp al, 0x20
    jb snoop_dot
    cmp al, 0x7e
    jbe snoop_out
snoop_dot:
    mov al, 0x2e
snoop_out:
    out dx, al
    inc ebx
    dec ecx
    jnz snoop_loop
    mov esi, msg_snoop_end
    call puts
    ret

msg_snoop:     .asciz "snooped the secret page: \""
msg_snoop_end: .asciz "\"\n"
