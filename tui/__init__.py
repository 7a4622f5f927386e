"""The Textual TUI: watch and step through a live migration (docs/tui.md).

``minivmm`` never imports this package: ``tui.cli.register`` adds the ``tui``
command (and the terminal form of ``demo``) through the ``minivmm.commands``
entry-point group.  Layers, each in its own module:

* ``model``      -- immutable snapshots (frozen dataclasses) the widgets render;
* ``phases``     -- the protocol phases, a record's phase, the help texts;
* ``capture``    -- a Machine (or an arriving RAM) to a snapshot, on an engine thread;
* ``stepper``    -- holds both engines between two steps while a student reads;
* ``live``       -- source and destination engines in worker threads, one loopback socket;
* ``transcript`` -- the versioned JSON-lines record of a session, writer and reader;
* ``widgets``, ``app`` -- the Textual screens; ``attacks`` -- the attack menu's registry.
"""
