; _ulib.s: small user-mode helpers; `.include "_ulib.s"` at the end of a program.
; All helpers preserve every register except eax (the system call result).
; Labels start with "ulib_" to stay out of the program's way.
;
; Protected programs: call ulib_protect first.  It names the first data page
; as the shared (uncloaked) page, and from then on ulib_write bounces every
; buffer through it, because the kernel only ever sees ciphertext of the
; process's other pages (docs/guest-abi.md, "Process protection").

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
    call ulib_write
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
    call ulib_write
    add esp, 16
    pop edi
    pop edx
    pop ecx
    pop ebx
    ret

ulib_trusted:               ; esi -> NUL-terminated string in protected memory:
    push ebx                    ; HC_TRUSTED_WRITE it (the VMM shows it, marked with
    push ecx                    ; this process's identity; the kernel never sees it).
    mov ebx, esi                ; eax = length, or -EPERM when not protected
    xor ecx, ecx
ulib_trusted_len:
    cmp byte ptr [ebx+ecx], 0
    je ulib_trusted_go
    inc ecx
    jmp ulib_trusted_len
ulib_trusted_go:
    mov eax, HC_TRUSTED_WRITE
    int 0x82
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

ulib_write:                 ; ebx = buffer, ecx = length -> eax = write(2) result
    push ebx
    push esi
    push edi
    push ecx
    mov edi, [ulib_shared]
    test edi, edi
    jz ulib_write_go        ; not protected: the kernel reads the buffer itself
    cmp ecx, 4096
    ja ulib_write_go        ; cannot bounce it: let the kernel say -EINVAL
    mov esi, ebx
    mov ebx, edi
ulib_write_copy:
    test ecx, ecx
    jz ulib_write_go
    mov al, [esi]
    mov [edi], al
    inc esi
    inc edi
    dec ecx
    jmp ulib_write_copy
ulib_write_go:
    pop ecx
    mov eax, SYS_WRITE
    int 0x80
    pop edi
    pop esi
    pop ebx
    ret

ulib_protect:               ; -> eax = HC_PROTECT result (0 = protected)
    push ebx
    push ecx
    mov ebx, [INFO_DATA_BASE_ADDR]  ; the shared page: first data page (data_pages >= 1)
    xor ecx, ecx                    ; flags: none defined
    mov eax, HC_PROTECT
    int 0x82
    test eax, eax
    jnz ulib_protect_out
    mov [ulib_shared], ebx
ulib_protect_out:
    pop ecx
    pop ebx
    ret

ulib_protect_if:            ; eax = index: if args[index] != 0, ulib_protect (else eax = 0)
    call ulib_arg
    test eax, eax
    jz ulib_protect_if_out
    call ulib_protect
ulib_protect_if_out:
    ret

ulib_shared: .long 0        ; the shared page once protected, else 0
