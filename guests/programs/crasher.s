; crasher: does one forbidden thing, chosen by args[0], to show that the
; kernel kills the offender and keeps everyone else running.
;   0 = read kernel memory (0x00100000)   -> #PF (protection, user)
;   1 = read an unmapped page (0x60000000) -> #PF (not present)
;   2 = write the read-only info page       -> #PF (protection, write)
;   3 = execute a privileged instruction   -> #GP (cli at CPL3... here: hlt)
;   4 = divide by zero                      -> #DE
;   5 = undefined instruction (ud2)         -> #UD
;   6 = port I/O from user mode             -> #GP
_start:
    mov esi, msg
    call ulib_puts
    xor eax, eax
    call ulib_arg
    cmp eax, 0
    je kmem
    cmp eax, 1
    je unmapped
    cmp eax, 2
    je rowrite
    cmp eax, 3
    je priv
    cmp eax, 4
    je divzero
    cmp eax, 5
    je undef
    cmp eax, 6
    je portio
    jmp survived
kmem:
    mov eax, [0x00100000]
    jmp survived
unmapped:
    mov eax, [0x60000000]
    jmp survived
rowrite:
    mov dword ptr [INFO_VADDR], 7
    jmp survived
priv:
    hlt
    jmp survived
divzero:
    xor edx, edx
    xor ecx, ecx
    mov eax, 1
    div ecx
    jmp survived
undef:
    ud2
    jmp survived
portio:
    mov dx, PORT_CONSOLE
    mov al, 0x21
    out dx, al
survived:
    mov esi, msg_alive
    call ulib_puts
    xor eax, eax
    call ulib_exit
msg:       .asciz "crasher: about to misbehave\n"
msg_alive: .asciz "crasher: still alive (should not happen)\n"
.include "_ulib.s"
