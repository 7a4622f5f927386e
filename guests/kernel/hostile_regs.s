; Hostile kernel 3: REGISTERS.  Adds 1000 to the victim's saved edi (the
; keeper's round counter) in the frame it will return with.  Unprotected the
; victim prints round 1001; protected, the kernel only ever saw scrubbed
; registers, and on the return the VMM notices the change, reports it and
; restores the real ones.
.include "hostile_common.s"

attack:
    add dword ptr [esi+PROC_FRAME], 1000          ; FRAME_EDI is offset 0
    mov esi, msg_regs
    call puts
    ret

msg_regs: .asciz "added 1000 to its saved edi\n"
