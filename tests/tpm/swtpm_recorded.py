"""Bytes recorded from a real TPM 2.0 (swtpm 0.7, libtpms) with tpm2-tools 5.

Recorded with (swtpm socket TCTI, fresh state, see test_tpm_swtpm_compare.py)::

    tpm2_createek -c ek.ctx -G ecc                      # EK: ECC P-256, template L-2
    tpm2_createak -C ek.ctx -c ak.ctx -G ecc -g sha256 -s ecdsa
    tpm2_readpublic -c ek.ctx -f tpmt -o ek.tpmt        # and the same for ak.ctx
    tpm2_pcrextend 8:sha256=$(printf a | sha256sum)
    tpm2_quote -c ak.ctx -l sha256:8,9,10 -q 6d696e69766d6d2d6b6174 -m q.msg -s q.sig -g sha256

They are known answers a model cannot have made up: the quote's qualifiedSigner is
the AK's Qualified Name as a real TPM computes it, and its signature is a real
TPM's ECDSA signature over q.msg.
"""

import hashlib

EK_PUBLIC = bytes.fromhex(
    "0023000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"
    "0006008000430010000300100020be549bfd49456293e38fbb27fdc512752e4ad9a50ba3c2cdc82269e1"
    "90e1ee8100204a289a503f21f147b3f2a121ddbbddec5a66647ce8ca916844c319bf7752db57"
)
AK_PUBLIC = bytes.fromhex(
    "0023000b00050072000000100018000b000300100020a6d54dbf7493c3b3451fdc919d4ddab68d646e2c"
    "9f2a4a6c8f428316e6cb7b0e0020df144dd116c633a7dd8ae99a595e2f98bdc3fea17b0af780f99f5c70"
    "15fab390"
)
QUOTE_ATTEST = bytes.fromhex(
    "ff54434780180022000b691edc843eea4a685b1969456618c9a12631663a97c4cedf51510a7a3535c247"
    "000b6d696e69766d6d2d6b61740000000000000275000000010000000001201910230016363600000001"
    "000b0300070000207b19771d72cd4e8522c9008d101ef8aae1afc7b77ab062be4476676897f1f39c"
)
QUOTE_SIGNATURE = bytes.fromhex(
    "0018000b0020b4406294d6063d32ea0ef656e5527b7e005b4eda02716f8e72393e26fc517aee00205a69"
    "5133901ff3789bcf9f3a8501ac25535b513fa27155f1b987f15b138aa941"
)
QUOTE_NONCE = b"minivmm-kat"
#: The one extend before the quote: PCR 8 by SHA-256("a"); PCRs 9 and 10 stay zero.
PCR8_EXTEND = hashlib.sha256(b"a").digest()
#: qualifiedSigner as swtpm wrote it (bytes 6..42 of QUOTE_ATTEST, after its TPM2B size).
QUALIFIED_SIGNER = QUOTE_ATTEST[8:42]
