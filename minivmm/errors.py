"""The VMM's exception hierarchy: every error says what went wrong and where."""


class VmmError(Exception):
    """Base class of every error minivmm raises on purpose."""


class ImageError(VmmError):
    """A guest image is malformed, truncated, or does not fit."""


class StateError(VmmError):
    """A saved machine state is malformed, truncated, or from another version."""


class GuestError(VmmError):
    """The guest stopped in a way that is not a clean shutdown."""


class TripleFault(GuestError):
    """An exception could not be delivered, nor #DF after it: a real CPU resets."""


class KernelPanic(GuestError):
    """The guest kernel reported that it gave up (HC_PANIC)."""


class GuestHang(GuestError):
    """The guest halted with interrupts disabled: nothing can ever wake it."""


class KeysDestroyed(VmmError):
    """A protected process's page key is gone from this VMM (the secure
    protocol destroys the keys before COMMIT: the VM migrated away), so its
    cloaked pages cannot be opened here and this copy cannot run on."""


class VmmInternalError(VmmError):
    """The VMM itself failed inside a Unicorn callback (a bug: please report)."""
