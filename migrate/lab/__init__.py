"""The migration attack lab (docs/lab-migration.md): LAB ONLY tools.

* ``capture``    -- the capture file format (versioned, bounded parser)
* ``records``    -- reading records as a man in the middle sees them
* ``relay``      -- the record-aware man in the middle (``minivmm mitm``)
* ``stream``     -- re-framing a readable stream so the plain engine's checks pass
* ``attacks``    -- the network attacks, one class each
* ``standalone`` -- replay-stream and impersonate (no live source relayed)
* ``eavesdrop``  -- what a captured stream gives away (the protected secret, in plain mode)
* ``hooks``      -- lab-only hooks on serve/run (toctou, double-resume)
* ``scenario``   -- ``minivmm lab ATTACK``: one whole scenario, then every process gone
* ``mitm_cli``, ``lab_cli`` -- the two commands
"""
