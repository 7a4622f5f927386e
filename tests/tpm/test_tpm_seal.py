"""Seal/unseal bound to a PCR policy: across PCR changes, restarts and TPMs."""

import hashlib

import pytest

from tpm import PcrSelection, SoftTpm, measure_vmm
from tpm.errors import FormatError, UnsealError
from tpm.seal import SealedBlob, policy_pcr_digest

from tpm_testdata import CONFIG, PROTECTION

SECRET = b"per-process key material \x00\x01\x02"


def test_policy_digest_is_tpm2_policypcr():
    sel = PcrSelection([8, 9, 10])
    pcr_digest = hashlib.sha256(bytes(96)).digest()
    expected = hashlib.sha256(
        bytes(32)
        + (0x0000017F).to_bytes(4, "big")  # TPM_CC_PolicyPCR
        + bytes.fromhex("00000001000b03000700")  # TPML_PCR_SELECTION
        + pcr_digest
    ).digest()
    assert policy_pcr_digest(sel, pcr_digest) == expected


def test_seal_unseal_and_fail_after_pcr_change(measured):
    blob = measured.seal(SECRET)
    assert measured.unseal(blob) == SECRET
    measured.extend(9, hashlib.sha256(b"config changed").digest(), data=b"x")
    with pytest.raises(UnsealError, match="PCR policy not satisfied"):
        measured.unseal(blob)


def test_unselected_pcr_change_does_not_matter(measured):
    blob = measured.seal(SECRET, pcrs=[8])
    measured.extend(16, bytes(32), data=b"debug")
    assert measured.unseal(blob) == SECRET


def test_seal_across_restart(tmp_path, issuer, vmm_code):
    tpm = SoftTpm.open(tmp_path / "h", issuer=issuer)
    measure_vmm(tpm, [vmm_code], CONFIG, PROTECTION)
    blob = tpm.seal(SECRET)

    restarted = SoftTpm.open(tmp_path / "h")  # PCRs back to zero ...
    with pytest.raises(UnsealError):
        restarted.unseal(blob)
    measure_vmm(restarted, [vmm_code], CONFIG, PROTECTION)  # ... same VMM measured again
    assert restarted.unseal(blob) == SECRET  # storage key survived the restart

    again = SoftTpm.open(tmp_path / "h")
    measure_vmm(again, [vmm_code], {**CONFIG, "memory_mb": 32}, PROTECTION)  # changed config
    with pytest.raises(UnsealError):
        again.unseal(blob)


def test_seal_to_explicit_future_digest(tpm):
    sel = PcrSelection([8])
    d = hashlib.sha256(b"approved").digest()
    future = hashlib.sha256(hashlib.sha256(bytes(32) + d).digest()).digest()
    blob = tpm.seal(SECRET, pcrs=sel, pcr_digest=future)
    with pytest.raises(UnsealError):
        tpm.unseal(blob)
    tpm.extend(8, d, data=b"approved")
    assert tpm.unseal(blob) == SECRET


def test_other_tpm_cannot_unseal(tmp_path):
    a, b = SoftTpm.open(tmp_path / "a"), SoftTpm.open(tmp_path / "b")
    blob = a.seal(SECRET, pcrs=[0])
    with pytest.raises(UnsealError, match="another TPM"):
        b.unseal(blob)  # same (zero) PCRs, different storage key


def test_tampered_blobs_fail_closed(measured):
    blob = measured.seal(SECRET)
    for i in range(0, len(blob), 5):
        bad = bytearray(blob)
        bad[i] ^= 0x80
        with pytest.raises(UnsealError):
            measured.unseal(bytes(bad))
    for cut in (0, 10, len(blob) - 1):
        with pytest.raises(UnsealError):
            measured.unseal(blob[:cut])


def test_swapping_the_policy_fails(measured):
    """Re-point a blob at PCRs that still match: the AEAD's associated data catches it."""
    blob = SealedBlob.from_bytes(measured.seal(SECRET, pcrs=[8, 9]))
    sel = PcrSelection([0])
    forged = SealedBlob(sel, policy_pcr_digest(sel, measured.pcr_digest(sel)), blob.iv, blob.ciphertext)
    with pytest.raises(UnsealError, match="authentication"):
        measured.unseal(forged.to_bytes())


def test_sealed_blob_round_trip_and_bounds(measured):
    raw = measured.seal(SECRET)
    blob = SealedBlob.from_bytes(raw)
    assert blob.to_bytes() == raw
    assert raw[:4] == b"MVSB"
    with pytest.raises(FormatError):
        SealedBlob.from_bytes(raw + b"\x00")
    with pytest.raises(ValueError):
        measured.seal(bytes(64 * 1024 + 1))


def test_sealed_without_a_pcr_policy_opens_on_this_tpm_only(measured, tmp_path):
    """pcrs=None: bound to the TPM's storage key alone (saved machine states)."""
    blob = measured.seal(SECRET, pcrs=None)
    assert blob[6:10] == bytes(4) and SealedBlob.from_bytes(blob).selection is None
    measured.extend(8, hashlib.sha256(b"another build").digest(), data=b"x")
    assert measured.unseal(blob) == SECRET                     # any PCR change: still opens
    with pytest.raises(UnsealError, match="sealed by another TPM"):
        SoftTpm.open(tmp_path / "other").unseal(blob)
    forged = bytearray(blob)
    forged[10] ^= 1                                            # a policy digest with no selection
    with pytest.raises(UnsealError, match="policy digest without a PCR selection"):
        measured.unseal(bytes(forged))
