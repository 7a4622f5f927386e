; dirtier: writes one dword into each page of a working set, over and over.
;   args[0] = working-set pages (0 = all data pages; capped at the data region)
;   args[1] = passes (0 = forever)
;   args[2] = ticks to sleep between passes (0 = none): sets the dirty rate
; Prints "dirtier: pass N" every 16 passes and "dirtier: done" at the end.
_start:
    mov eax, [INFO_DATA_PAGES_ADDR]
    mov [pages], eax
    xor eax, eax
    call ulib_arg
    test eax, eax
    jz ws_all
    cmp eax, [pages]
    ja ws_all
    mov [pages], eax
ws_all:
    mov eax, 1
    call ulib_arg
    mov [passes], eax
    mov eax, 2
    call ulib_arg
    mov [nap], eax
pass:
    inc dword ptr [count]
    mov edi, [INFO_DATA_BASE_ADDR]
    mov ecx, [pages]
    mov edx, [count]
    test ecx, ecx
    jz pass_done
touch:
    mov [edi], edx
    add edi, 0x1000
    dec ecx
    jnz touch
pass_done:
    mov eax, [count]
    test eax, 15
    jnz no_report
    mov esi, msg_pass
    call ulib_puts
    mov eax, [count]
    call ulib_putdec
    mov esi, newline
    call ulib_puts
no_report:
    mov eax, [passes]
    test eax, eax
    jz sleep_maybe
    cmp [count], eax
    jae finished
sleep_maybe:
    mov ebx, [nap]
    test ebx, ebx
    jz pass
    mov eax, SYS_SLEEP
    int 0x80
    jmp pass
finished:
    mov esi, msg_done
    call ulib_puts
    xor eax, eax
    call ulib_exit

msg_pass: .asciz "dirtier: pass "
msg_done: .asciz "dirtier: done\n"
newline:  .asciz "\n"
pages:    .long 0
passes:   .long 0
nap:      .long 0
count:    .long 0
.include "_ulib.s"
