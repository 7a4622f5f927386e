; keeper: the secret keeper, target of the attack lab's hostile kernels.
;   args[0] = rounds, args[1] = 1 to ask for protection.  Needs 3 data pages:
;   DATA_VADDR          the shared page (system-call buffers)
;   DATA_VADDR+0x1000   the secret page: holds SECRET
;   DATA_VADDR+0x2000   a decoy page
; Every round it sleeps one tick (a system call with the round counter N
; live in edi: what the register attack changes), checks the secret page
; against its own copy and prints "keeper: round N, secret intact".  A changed secret prints "keeper: SECRET CHANGED"
; and exits 1; otherwise it exits 0 after the last round.  Protected, it also
; gives each verdict through HC_TRUSTED_WRITE ("secret intact" per round,
; "done: ..." at the end): the VMM shows those marked with its identity, and
; the kernel can neither forge nor drop them (docs/lab-attacks.md).
.equ SECRET_PAGE, 0x40801000
.equ DECOY_PAGE, 0x40802000
.equ SECRET_LEN, 32

_start:
    mov eax, 1
    call ulib_arg
    test eax, eax
    jz kp_setup
    call ulib_protect
    mov esi, msg_protected
    test eax, eax
    jz kp_say
    mov esi, msg_refused
kp_say:
    call ulib_puts
kp_setup:
    mov esi, secret                 ; the secret goes into its page...
    mov edi, SECRET_PAGE
    mov ecx, SECRET_LEN
    call copy
    mov esi, decoy                  ; ...and something else into the decoy page
    mov edi, DECOY_PAGE
    mov ecx, SECRET_LEN
    call copy
    xor edi, edi                    ; the round counter lives in a register
kp_loop:
    inc edi
    mov eax, SYS_SLEEP
    mov ebx, 1
    int 0x80
    mov esi, secret
    mov ebx, SECRET_PAGE
    mov ecx, SECRET_LEN
kp_cmp:
    mov al, [esi]
    cmp al, [ebx]
    jne kp_changed
    inc esi
    inc ebx
    dec ecx
    jnz kp_cmp
    mov esi, msg_verified
    call ulib_trusted               ; the verdict the kernel cannot forge (protected only)
    mov esi, msg_round
    call ulib_puts
    mov eax, edi
    call ulib_putdec
    mov esi, msg_intact
    call ulib_puts
    mov eax, 0
    call ulib_arg
    cmp edi, eax
    jb kp_loop
    mov esi, msg_done
    call ulib_puts
    mov esi, msg_done_verified
    call ulib_trusted
    xor eax, eax
    call ulib_exit
kp_changed:
    mov esi, msg_changed
    call ulib_puts
    mov eax, 1
    call ulib_exit

copy:                               ; esi -> edi, ecx bytes
    mov al, [esi]
    mov [edi], al
    inc esi
    inc edi
    dec ecx
    jnz copy
    ret

secret:        .ascii "swordfish: launch code 4-8-15-16"
decoy:         .ascii "decoy decoy decoy decoy decoy de"
msg_protected: .asciz "keeper: protected by the VMM\n"
msg_refused:   .asciz "keeper: protection refused, running unprotected\n"
msg_round:     .asciz "keeper: round "
msg_intact:    .asciz ", secret intact\n"
msg_done:      .asciz "keeper: done\n"
msg_verified:  .asciz "secret intact"
msg_done_verified: .asciz "done: the secret was intact every round"
msg_changed:   .asciz "keeper: SECRET CHANGED\n"
.include "_ulib.s"
