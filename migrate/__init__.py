"""Live migration of minivmm guests between two VMM processes (issue 5, plain mode).

One concept per module:

| module | what |
|---|---|
| ``wire`` | the record layer: framing, bounds, sequence numbers, the ``Channel``; the message sequence and state diagrams |
| ``messages`` | the bodies of the records, each decoded with its own checks |
| ``digest`` | the completeness digest (a GMAC per page record, folded in order) |
| ``precopy`` | the round policy: when pre-copy stops |
| ``source`` | pre-copy with the guest running, stop-and-copy, commit |
| ``destination`` | receive, verify, rebuild, resume exactly once |
| ``statecheck`` | the state document a destination accepts: its bounds and one strict validator |
| ``jsonscan`` | a bounded JSON parse: depth and object counts measured before ``json.loads`` |
| ``server`` | the listening socket: one migration at a time, others refused |
| ``report`` / ``events`` | the migration report and typed events |
| ``measure`` | measuring the VMM into its TPM at start (issue 4) |
| ``cli`` / ``demo`` / ``bench`` | ``minivmm serve``, ``run --migrate-to``, ``demo``, ``bench-migrate`` |

Dependency direction: ``migrate -> minivmm, tpm``; ``minivmm`` never imports this package.
"""
