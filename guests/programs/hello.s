; hello: print one line and exit(0).
_start:
    mov eax, SYS_WRITE
    mov ebx, msg
    mov ecx, msg_end - msg
    int 0x80
    mov eax, SYS_EXIT
    xor ebx, ebx
    int 0x80
msg: .ascii "hello, world\n"
msg_end:
