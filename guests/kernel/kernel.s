; toykernel: the minivmm guest kernel (x86, 32-bit protected mode, paging).
;
; One kernel stack, no kernel preemption: every trap saves the interrupted
; process's registers into its process-table slot (the "frame"), and every
; return to user mode copies a frame back onto the stack and executes iretd.
; The kernel runs with IF=0; user processes run with IF=1, so the VMM's timer
; (vector 0x20) only ever interrupts user mode or the idle loop.
;
; The image builder (guests/build.py) fills in, before boot:
;   boot_kernel_pd   physical address of the kernel-only page directory
;   proc_table       one slot per process: state, pid, cr3, initial frame, name
; Every constant (SYS_*, HC_*, PROC_*, FRAME_*, selectors, ports) comes from
; minivmm/abi.py through the assembler prelude.
;
; Boot protocol (what the VMM's loader guarantees, like a multiboot loader):
; CPL0, protected mode, paging off, IF=0, CS=0x08 and DS=ES=SS=0x10 flat from
; a boot GDT at BOOT_GDT_PADDR, esp = top of the kernel stack, eip = here.

kernel_entry:
    lgdt [gdt_ptr]                  ; our own GDT (the loader's is temporary)
    mov ax, SEL_KDATA
    mov ds, ax
    mov es, ax
    mov fs, ax
    mov gs, ax
    mov ss, ax
    mov esp, kstack_top
    push SEL_KCODE                  ; reload CS: keystone's far jmp is broken
    push reload_cs
    retf
reload_cs:
    ; TSS descriptor: the base is only known here, split across the descriptor.
    mov eax, tss
    mov ebx, eax
    shl ebx, 16
    or ebx, 0x67                    ; limit = 103
    mov [gdt_tss], ebx
    mov ebx, eax
    and ebx, 0xFF000000
    mov ecx, eax
    shr ecx, 16
    and ecx, 0xFF
    or ebx, ecx
    or ebx, 0x8900                  ; present, DPL0, type 9 (available 32-bit TSS)
    mov [gdt_tss+4], ebx
    ; TSS: where the CPU (here: the VMM) finds the kernel stack on a ring 3->0 switch.
    mov dword ptr [tss+4], kstack_top
    mov dword ptr [tss+8], SEL_KDATA
    mov word ptr [tss+102], 0x68    ; I/O bitmap offset past the limit: no bitmap
    mov ax, SEL_TSS
    ltr ax

    ; IDT: one gate per entry of idt_init (vector, stub, type/attributes).
    mov esi, idt_init
idt_loop:
    mov eax, [esi]
    cmp eax, 0xFFFFFFFF
    je idt_done
    mov ebx, [esi+4]
    mov ecx, [esi+8]
    lea edi, [idt + eax*8]
    mov edx, ebx
    and edx, 0xFFFF
    or edx, 0x00080000              ; selector SEL_KCODE in bits 16..31
    mov [edi], edx
    mov edx, ebx
    and edx, 0xFFFF0000
    shl ecx, 8
    or edx, ecx
    mov [edi+4], edx
    add esi, 12
    jmp idt_loop
idt_done:
    lidt [idt_ptr]

    mov esi, msg_banner
    call puts

    ; Paging: the kernel-only directory until the first process runs.
    ; CR0.WP makes the kernel obey read-only pages too.
    mov eax, [boot_kernel_pd]
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80010000
    mov cr0, eax

    ; Tell the VMM which processes exist (it names them in its events).
    mov esi, proc_table
    mov ecx, NPROC
announce_loop:
    cmp dword ptr [esi+PROC_STATE], P_RUNNABLE
    jne announce_next
    push ecx
    mov eax, HC_PROC_START
    mov ebx, [esi+PROC_PID]
    mov ecx, [esi+PROC_CR3]
    lea edx, [esi+PROC_NAME]
    int 0x82
    pop ecx
announce_next:
    add esi, PROC_SIZE
    dec ecx
    jnz announce_loop
    mov dword ptr [rr], 15          ; NPROC - 1: the first pick is slot 0
    jmp schedule

; ---------------------------------------------------------------------------
; Trap entry.  Stack on arrival (pushed by the stub and the VMM's delivery):
;   [vector] [error code] [eip] [cs] [eflags] ([esp] [ss] from user mode)
alltraps:
    pushad
    cld
    mov ax, SEL_KDATA
    mov ds, ax
    mov es, ax
    mov ebp, esp                    ; ebp -> frame (FRAME_* offsets)
    mov eax, [ebp+FRAME_VEC]
    test dword ptr [ebp+FRAME_CS], 3
    jz trap_from_kernel
    mov edi, [cur]                  ; save the user frame in the process slot
    lea edi, [edi+PROC_FRAME]
    mov esi, ebp
    mov ecx, FRAME_WORDS
    rep movsd
    cmp eax, VEC_TIMER
    je timer_tick
    cmp eax, VEC_SYSCALL
    je syscall
    jmp kill_current                ; any exception raised in user mode

trap_from_kernel:
    cmp eax, VEC_TIMER
    je timer_tick                   ; only the idle loop runs with IF=1
    cmp eax, VEC_PF
    jne panic
    ; A page fault while copying from user memory is the user's fault:
    ; resume at the copy's fixup, which returns -EFAULT (Linux's exception table).
    mov ebx, [ebp+FRAME_EIP]
    cmp ebx, ucopy_start
    jb panic
    cmp ebx, ucopy_end
    jae panic
    mov dword ptr [ebp+FRAME_EIP], ucopy_fault
    popad
    add esp, 8
    iretd

panic:
    mov esi, msg_panic
    call puts
    mov eax, [ebp+FRAME_VEC]
    call puthex
    mov esi, msg_at_eip
    call puts
    mov eax, [ebp+FRAME_EIP]
    call puthex
    mov esi, msg_newline
    call puts
    mov eax, HC_PANIC
    mov ebx, [ebp+FRAME_VEC]
    mov ecx, [ebp+FRAME_EIP]
    int 0x82
    cli
panic_halt:
    hlt
    jmp panic_halt

timer_tick:
    inc dword ptr [ticks]
    jmp schedule

; ---------------------------------------------------------------------------
; Scheduler: round robin over the process table, starting after the last pick.
schedule:
    mov esp, kstack_top             ; nothing on the kernel stack survives
    mov esi, proc_table             ; wake the sleepers whose time has come
    mov ecx, NPROC
wake_loop:
    cmp dword ptr [esi+PROC_STATE], P_SLEEPING
    jne wake_next
    mov eax, [ticks]
    cmp eax, [esi+PROC_WAKE]
    jb wake_next
    mov dword ptr [esi+PROC_STATE], P_RUNNABLE
wake_next:
    add esi, PROC_SIZE
    dec ecx
    jnz wake_loop

    mov ebx, [rr]
    mov ecx, NPROC
pick_loop:
    inc ebx
    and ebx, 15                     ; NPROC is 16
    mov esi, ebx
    shl esi, 7                      ; PROC_SIZE is 128
    add esi, proc_table
    cmp dword ptr [esi+PROC_STATE], P_RUNNABLE
    je run_proc
    dec ecx
    jnz pick_loop

    mov esi, proc_table             ; nobody runnable: is anybody asleep?
    mov ecx, NPROC
live_loop:
    cmp dword ptr [esi+PROC_STATE], P_SLEEPING
    je idle
    add esi, PROC_SIZE
    dec ecx
    jnz live_loop
    mov dword ptr [cur], 0          ; everyone is gone: power off
    mov esi, msg_alldone
    call puts
    mov eax, HC_SHUTDOWN
    xor ebx, ebx
    int 0x82
    cli
off_halt:
    hlt
    jmp off_halt

idle:
    ; Wait for the timer with interrupts on.  hlt ends the VMM's slice, which
    ; skips virtual time ahead to the next tick; the tick enters alltraps
    ; from ring 0 and comes back to schedule.
    mov dword ptr [cur], 0
    sti
    hlt
    cli
    jmp schedule

run_proc:
    mov [rr], ebx
    mov [cur], esi
resume:                             ; esi = process to (re)enter
    mov eax, [esi+PROC_CR3]
    mov ebx, cr3
    cmp eax, ebx
    je resume_same_as
    mov cr3, eax                    ; a CR3 load flushes the TLB: only when it changes
resume_same_as:
    mov esp, kstack_top - 0x3c      ; room for one frame (FRAME_WORDS * 4)
    mov edi, esp
    lea esi, [esi+PROC_FRAME]
    mov ecx, FRAME_WORDS
    rep movsd
    mov ax, SEL_UDATA
    mov ds, ax
    mov es, ax
    popad
    add esp, 8                      ; vector and error code
    iretd

; ---------------------------------------------------------------------------
; A user-mode exception kills the process; the others keep running.
kill_current:
    mov esi, [cur]
    mov eax, [ebp+FRAME_VEC]
    mov [esi+PROC_FAULT_VEC], eax
    mov ebx, cr2
    mov [esi+PROC_FAULT_ADDR], ebx
    mov ebx, [ebp+FRAME_EIP]
    mov [esi+PROC_FAULT_EIP], ebx
    add eax, 128
    mov [esi+PROC_EXIT], eax
    mov dword ptr [esi+PROC_STATE], P_KILLED
    push esi
    mov esi, msg_killed
    call puts
    mov esi, [esp]
    mov eax, [esi+PROC_PID]
    call putdec
    mov esi, msg_vector
    call puts
    mov esi, [esp]
    mov eax, [esi+PROC_FAULT_VEC]
    call putdec
    mov esi, msg_at_eip
    call puts
    mov esi, [esp]
    mov eax, [esi+PROC_FAULT_EIP]
    call puthex
    mov esi, [esp]
    cmp dword ptr [esi+PROC_FAULT_VEC], VEC_PF
    jne kill_nl
    mov esi, msg_cr2
    call puts
    mov esi, [esp]
    mov eax, [esi+PROC_FAULT_ADDR]
    call puthex
kill_nl:
    mov esi, msg_newline
    call puts
    pop esi
    mov eax, HC_PROC_EXIT
    mov ebx, [esi+PROC_PID]
    mov ecx, [esi+PROC_EXIT]
    int 0x82
    jmp schedule

; ---------------------------------------------------------------------------
; System calls: eax = number, ebx/ecx/edx = arguments; the result goes into
; the saved eax of the frame.  esi = current process throughout.
syscall:
    mov esi, [cur]
    call syscall_hook               ; nothing in this kernel; the hostile ones attack here
    mov esi, [cur]
    mov eax, [esi+PF_EAX]
    cmp eax, SYS_EXIT
    je sys_exit
    cmp eax, SYS_WRITE
    je sys_write
    cmp eax, SYS_YIELD
    je sys_yield
    cmp eax, SYS_GETPID
    je sys_getpid
    cmp eax, SYS_SLEEP
    je sys_sleep
    cmp eax, SYS_TICKS
    je sys_ticks
    mov eax, ENOSYS
    neg eax
    mov [esi+PF_EAX], eax
    jmp resume

sys_exit:
    mov eax, [esi+PF_EBX]
    mov [esi+PROC_EXIT], eax
    mov dword ptr [esi+PROC_STATE], P_EXITED
    mov ecx, eax
    mov ebx, [esi+PROC_PID]
    mov eax, HC_PROC_EXIT
    int 0x82
    jmp schedule

sys_yield:
    mov dword ptr [esi+PF_EAX], 0
    jmp schedule

sys_getpid:
    mov eax, [esi+PROC_PID]
    mov [esi+PF_EAX], eax
    jmp resume

sys_ticks:
    mov eax, [ticks]
    mov [esi+PF_EAX], eax
    jmp resume

sys_sleep:
    mov dword ptr [esi+PF_EAX], 0
    mov eax, [esi+PF_EBX]
    test eax, eax
    jz schedule                     ; sleep(0) is yield
    add eax, [ticks]
    mov [esi+PROC_WAKE], eax
    mov dword ptr [esi+PROC_STATE], P_SLEEPING
    jmp schedule

sys_write:
    mov ebx, [esi+PF_EBX]     ; buffer
    mov ecx, [esi+PF_ECX]     ; length
    cmp ecx, 4096
    ja write_einval
    cmp ebx, USER_BASE
    jb write_efault
    mov eax, ebx
    add eax, ecx
    jc write_efault
    cmp eax, USER_END
    ja write_efault
    mov eax, [esi+PROC_PID]          ; the VMM files what follows under this pid
    mov dx, PORT_CONSOLE_CHANNEL
    out dx, al
    mov dx, PORT_CONSOLE
    push esi
    mov esi, ebx
    test ecx, ecx
    jz ucopy_end
ucopy_start:                        ; faults in here return -EFAULT (see trap_from_kernel)
    lodsb
    out dx, al
    dec ecx
    jnz ucopy_start
ucopy_end:
    pop esi
    mov eax, [esi+PF_ECX]
    mov [esi+PF_EAX], eax
    jmp write_out
ucopy_fault:
    pop esi
write_efault:
    mov eax, EFAULT
    neg eax
    mov [esi+PF_EAX], eax
    jmp write_out
write_einval:
    mov eax, EINVAL
    neg eax
    mov [esi+PF_EAX], eax
write_out:
    xor eax, eax
    mov dx, PORT_CONSOLE_CHANNEL
    out dx, al
    jmp resume

; The system-call hook: `ret` here; the attack lab's hostile kernels
; (guests/kernel/hostile_*.s) replace this include with their attack.
.include "hook_none.s"

; ---------------------------------------------------------------------------
; Console helpers (kernel channel).  All preserve every register.
puts:                               ; esi -> NUL-terminated string
    pushad
    mov dx, PORT_CONSOLE
puts_loop:
    lodsb
    test al, al
    jz puts_done
    out dx, al
    jmp puts_loop
puts_done:
    popad
    ret

puthex:                             ; eax -> "0x%08x"
    pushad
    mov ebx, eax
    mov dx, PORT_CONSOLE
    mov al, 0x30
    out dx, al
    mov al, 0x78
    out dx, al
    mov ecx, 8
puthex_loop:
    rol ebx, 4
    mov eax, ebx
    and eax, 0xF
    mov al, [hexdigits+eax]
    out dx, al
    dec ecx
    jnz puthex_loop
    popad
    ret

putdec:                             ; eax -> unsigned decimal
    pushad
    xor ecx, ecx
    mov ebx, 10
putdec_div:
    xor edx, edx
    div ebx
    push edx
    inc ecx
    test eax, eax
    jnz putdec_div
    mov dx, PORT_CONSOLE
putdec_out:
    pop eax
    add al, 0x30
    out dx, al
    dec ecx
    jnz putdec_out
    popad
    ret

; ---------------------------------------------------------------------------
; Vector stubs: make every frame look the same (the VMM pushes an error code
; only for the vectors that have one, like the CPU does).
vec0:  push 0
       push 0
       jmp alltraps
vec1:  push 0
       push 1
       jmp alltraps
vec2:  push 0
       push 2
       jmp alltraps
vec3:  push 0
       push 3
       jmp alltraps
vec4:  push 0
       push 4
       jmp alltraps
vec5:  push 0
       push 5
       jmp alltraps
vec6:  push 0
       push 6
       jmp alltraps
vec7:  push 0
       push 7
       jmp alltraps
vec8:  push 8
       jmp alltraps
vec10: push 10
       jmp alltraps
vec11: push 11
       jmp alltraps
vec12: push 12
       jmp alltraps
vec13: push 13
       jmp alltraps
vec14: push 14
       jmp alltraps
vec16: push 0
       push 16
       jmp alltraps
vec17: push 17
       jmp alltraps
vec18: push 0
       push 18
       jmp alltraps
vec19: push 0
       push 19
       jmp alltraps
vec_timer:
       push 0
       push VEC_TIMER
       jmp alltraps
vec_syscall:
       push 0
       push VEC_SYSCALL
       jmp alltraps

; ---------------------------------------------------------------------------
; Data.
idt_init:                           ; vector, stub, gate type (0x8E: DPL0 interrupt gate)
    .long 0, vec0, 0x8E
    .long 1, vec1, 0x8E
    .long 2, vec2, 0x8E
    .long 3, vec3, 0xEE             ; int3 allowed from user mode
    .long 4, vec4, 0x8E
    .long 5, vec5, 0x8E
    .long 6, vec6, 0x8E
    .long 7, vec7, 0x8E
    .long 8, vec8, 0x8E
    .long 10, vec10, 0x8E
    .long 11, vec11, 0x8E
    .long 12, vec12, 0x8E
    .long 13, vec13, 0x8E
    .long 14, vec14, 0x8E
    .long 16, vec16, 0x8E
    .long 17, vec17, 0x8E
    .long 18, vec18, 0x8E
    .long 19, vec19, 0x8E
    .long VEC_TIMER, vec_timer, 0x8E
    .long VEC_SYSCALL, vec_syscall, 0xEE   ; DPL3: user mode may int 0x80
    .long 0xFFFFFFFF, 0, 0

msg_banner:  .asciz "toykernel: booting\n"
msg_alldone: .asciz "toykernel: all processes exited\n"
msg_panic:   .asciz "toykernel: PANIC vector "
msg_killed:  .asciz "toykernel: killed pid "
msg_vector:  .asciz ": vector "
msg_at_eip:  .asciz " at eip "
msg_cr2:     .asciz " cr2 "
msg_newline: .asciz "\n"
hexdigits:   .ascii "0123456789abcdef"

ticks:          .long 0
cur:            .long 0             ; current process slot (0 = idle)
rr:             .long 0             ; index of the last process picked
boot_kernel_pd: .long 0             ; filled in by the image builder

gdt:
    .long 0, 0
    .long 0x0000FFFF, 0x00CF9A00    ; 0x08 kernel code: flat, 32-bit, DPL0
    .long 0x0000FFFF, 0x00CF9200    ; 0x10 kernel data
    .long 0x0000FFFF, 0x00CFFA00    ; 0x1b user code: DPL3
    .long 0x0000FFFF, 0x00CFF200    ; 0x23 user data: DPL3
gdt_tss:
    .long 0, 0                      ; 0x28 TSS, filled at boot
gdt_ptr:
    .word 0x2f                      ; 6 descriptors * 8 - 1
    .long gdt
idt_ptr:
    .word 0x7ff                     ; 256 gates * 8 - 1
    .long idt

tss:        .space 104, 0
idt:        .space 2048, 0
proc_table: .space 2048, 0          ; NPROC * PROC_SIZE, filled by the builder
kstack:     .space 8192, 0
kstack_top:
