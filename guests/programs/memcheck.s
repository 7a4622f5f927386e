; memcheck: QEMU's migration-test idea.  For generation g = 1, 2, ... it
; writes g into the first and (g xor page index) into the last dword of every
; data page, yields, then verifies every page.  A page that lost a write (say,
; one a live migration forgot) shows up as a mismatch.
;   args[0] = generations (0 = forever)
; Prints "memcheck: gen G ok" per generation; on a mismatch prints
; "memcheck: MISMATCH page P gen G" and exits 1; exits 0 when done.
_start:
    xor eax, eax
    call ulib_arg
    mov [gens], eax
generation:
    inc dword ptr [gen]
    mov edi, [INFO_DATA_BASE_ADDR]
    mov ecx, [INFO_DATA_PAGES_ADDR]
    xor ebx, ebx                    ; page index
    mov edx, [gen]
write_loop:
    cmp ebx, ecx
    jae written
    mov [edi], edx
    mov eax, edx
    xor eax, ebx
    mov [edi+0xffc], eax
    add edi, 0x1000
    inc ebx
    jmp write_loop
written:
    mov eax, SYS_YIELD
    int 0x80
    mov edi, [INFO_DATA_BASE_ADDR]
    mov ecx, [INFO_DATA_PAGES_ADDR]
    xor ebx, ebx
    mov edx, [gen]
check_loop:
    cmp ebx, ecx
    jae checked
    cmp [edi], edx
    jne mismatch
    mov eax, edx
    xor eax, ebx
    cmp [edi+0xffc], eax
    jne mismatch
    add edi, 0x1000
    inc ebx
    jmp check_loop
checked:
    mov esi, msg_gen
    call ulib_puts
    mov eax, [gen]
    call ulib_putdec
    mov esi, msg_ok
    call ulib_puts
    mov eax, [gens]
    test eax, eax
    jz generation
    cmp [gen], eax
    jb generation
    xor eax, eax
    call ulib_exit
mismatch:
    mov [bad], ebx
    mov esi, msg_bad
    call ulib_puts
    mov eax, [bad]
    call ulib_putdec
    mov esi, msg_badgen
    call ulib_puts
    mov eax, [gen]
    call ulib_putdec
    mov esi, newline
    call ulib_puts
    mov eax, 1
    call ulib_exit

msg_gen:    .asciz "memcheck: gen "
msg_ok:     .asciz " ok\n"
msg_bad:    .asciz "memcheck: MISMATCH page "
msg_badgen: .asciz " gen "
newline:    .asciz "\n"
gen:        .long 0
gens:       .long 0
bad:        .long 0
.include "_ulib.s"
