; Hostile kernel 2: TAMPER.  Overwrites the start of the victim's secret
; page.  Unprotected the victim finds its secret changed; protected, the
; kernel wrote into ciphertext, and the victim's next touch fails the MAC:
; the VMM stops it and reports an integrity violation.
.include "hostile_common.s"

attack:
    mov dword ptr [HK_SECRET_PAGE], 0x4b434148    ; "HACK"
    mov dword ptr [HK_SECRET_PAGE+4], 0x21214445  ; "ED!!"
    mov esi, msg_tamper
    call puts
    ret

msg_tamper: .asciz "overwrote the secret page with HACKED!!\n"
