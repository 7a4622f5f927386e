; Shared part of the hostile kernels: pick the victim and the moment.
; syscall_hook is called at every system call with esi = the caller's
; process slot and the caller's CR3 loaded (so its user pages are reachable
; at their own virtual addresses: the kernel needs no help to read them).
; The victim is chosen by hostile_victim.s (at least 3 data pages: the
; secret keeper); the attack runs once, at the victim's 2nd system call,
; when its secret is in place.  `attack` may clobber every register but
; esi/ebp.
.equ HK_SECRET_PAGE, 0x40801000
.equ HK_DECOY_PAGE, 0x40802000

.include "hostile_victim.s"

syscall_hook:
    call hk_victim_call
    cmp eax, 2
    jne hk_out
    push esi
    mov esi, hk_banner
    call puts
    mov esi, [esp]
    mov eax, [esi+PROC_PID]
    call putdec
    mov esi, hk_colon
    call puts
    mov esi, [esp]
    call attack
    pop esi
hk_out:
    ret

hk_banner: .asciz "hostile kernel: pid "
hk_colon:  .asciz ": "
