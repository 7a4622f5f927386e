; Hostile kernel 4: SWAP.  Exchanges the page-table entries of the victim's
; secret page and decoy page.  Unprotected the victim reads the decoy where
; its secret should be; protected, the VMM finds the frame of another page
; at the secret's address: integrity violation, the victim is stopped.
.include "hostile_common.s"

attack:
    mov eax, [esi+PROC_CR3]         ; its page directory (the kernel maps all of RAM)
    mov eax, [eax+0x408]            ; PDE 0x102: the table for 0x40800000..
    and eax, 0xFFFFF000
    mov ebx, [eax+4]                ; PTE of 0x40801000 (secret)
    mov ecx, [eax+8]                ; PTE of 0x40802000 (decoy)
    mov [eax+4], ecx
    mov [eax+8], ebx
    mov eax, cr3                    ; drop stale translations
    mov cr3, eax
    mov esi, msg_swap
    call puts
    ret

msg_swap: .asciz "swapped the page-table entries of its secret and decoy pages\n"
