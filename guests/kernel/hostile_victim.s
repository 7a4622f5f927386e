; Who a hostile kernel attacks, and when: shared by the attack lab's kernels
; (hostile_common.s) and by the test suite's own hostile hooks.
; Victims are processes with at least 3 data pages (how the secret keeper is
; built).  Call hk_victim_call from syscall_hook (esi = the caller's process
; slot): eax = how many system calls this victim has made, this one included
; (1, 2, ...), or 0 when the caller is not a victim.  Clobbers eax only.
hk_victim_call:
    cmp dword ptr [INFO_DATA_PAGES_ADDR], 3
    jb hk_not_victim
    mov eax, [esi+PROC_PID]
    inc dword ptr [hk_count+eax*4]
    mov eax, [hk_count+eax*4]
    ret
hk_not_victim:
    xor eax, eax
    ret

hk_count:  .space 68, 0              ; system calls per pid (pids 1..16)
