"""The secure migration protocol (DESIGN §6; Zhang & Chen, JNSM 2013).

One module per obligation, all called by the plain engine through a *mode*
object at fixed points (``mode.py``):

* ``keyschedule.py`` -- X25519 ephemeral exchange, transcript hash, HKDF
  into per-direction record keys, a key-release key and a commit key;
* ``channel.py``     -- the sealed record channel (AES-256-GCM per record,
  header as associated data, nonce = direction || sequence number);
* ``attest.py``      -- TPM quotes bound to the session, verified against
  the issuer and the policy of approved VMM measurements;
* ``keyrelease.py``  -- the final phase: fresh quote, process keys wrapped
  to a key that only the destination's TPM releases while its PCRs hold the
  attested values;
* ``generation.py``  -- per-VM identity and migration generation, checked
  against the destination TPM's NV counter;
* ``commit.py``      -- who runs: commit and abort tokens, the durable
  migrated-away mark;
* ``mode.py``        -- PlainMode (nothing at every seam) and SecureMode.

See docs/protocol.md.
"""
