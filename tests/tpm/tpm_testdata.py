"""Constants shared by the TPM tests (a uniquely named helper, not a conftest import)."""

CONFIG = {"memory_mb": 16, "cpus": 1, "deterministic": True}
PROTECTION = {"cloaking": True, "aead": "AES-256-GCM", "register_scrub": True}
