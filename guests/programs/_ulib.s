; _ulib.s: small user-mode helpers; `.include "_ulib.s"` at the end of a program.
; All helpers preserve every register except eax (the system call result).
; Labels start with "ulib_" to stay out of the program's way.

ulib_puts:                  ; esi -> NUL-terminated string: write(2) it
    push ebx
    push ecx
    mov ebx, esi
    xor ecx, ecx
ulib_puts_len:
    cmp byte ptr [ebx+ecx], 0
    je ulib_puts_go
    inc ecx
    jmp ulib_puts_len
ulib_puts_go:
    mov eax, SYS_WRITE
    int 0x80
    pop ecx
    pop ebx
    ret

ulib_putdec:                ; eax = unsigned value: write it in decimal
    push ebx
    push ecx
    push edx
    push edi
    sub esp, 16
    lea edi, [esp+15]
    mov ebx, 10
    xor ecx, ecx
ulib_putdec_div:
    xor edx, edx
    div ebx
    add dl, 0x30
    mov [edi], dl
    dec edi
    inc ecx
    test eax, eax
    jnz ulib_putdec_div
    lea ebx, [edi+1]
    mov eax, SYS_WRITE
    int 0x80
    add esp, 16
    pop edi
    pop edx
    pop ecx
    pop ebx
    ret

ulib_arg:                   ; eax = index -> eax = args[index] from the info page
    mov eax, [INFO_ARGS_ADDR + eax*4]
    ret

ulib_exit:                  ; eax = status
    mov ebx, eax
    mov eax, SYS_EXIT
    int 0x80
