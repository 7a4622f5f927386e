"""``check_restore`` (migrate/secure/rollback.py) on its own: which copy of a VM
that left this host is old (issue 19, seeded bugs).

The two-host stories are in test_state_rollback.py; here each rule is pinned
with real mark files (``commit.MigrationMark``) and a real soft TPM on disk:
the copy at the marked generation is the current one (the VM recovered after
an unconfirmed commit carries it), a host with neither a mark nor a TPM has
nothing to refuse with, and the TPM handed in is the one consulted."""

import pytest

from guests.build import Program, build_image
from migrate.secure import commit, generation
from migrate.secure.errors import OldCopy
from migrate.secure.rollback import check_restore
from minivmm.machine import Machine
from minivmm.state import MachineState
from tpm import SoftTpm

VM = "5e" * 16


@pytest.fixture(scope="module")
def image():
    return build_image([Program.builtin("counter", args=(3, 1000))])


def machine(image, gen, vm=VM):
    m = Machine(image)
    m.migration_identity = (vm, gen)
    return m


@pytest.mark.parametrize("state", ["migrated-away", "pending"])
def test_the_copy_at_the_marked_generation_is_not_an_old_copy(tmp_path, image, state):
    """The mark names the generation the VM left with (the source's machine
    carries it once both ends attested): that copy is the current one, an
    earlier one is old."""
    mark = commit.MigrationMark(tmp_path, VM, 4)
    mark.prepare()
    if state == "migrated-away":
        mark.commit(4, "10.0.0.2:7000", b"sealed")
    mark.close()
    check_restore(machine(image, 4), tmp_path, "current")
    check_restore(machine(image, 5), tmp_path, "newer")
    with pytest.raises(OldCopy, match=f"marked {state} from this host.* generation 4 .*generation 3, an older"):
        check_restore(machine(image, 3), tmp_path, "old")
    check_restore(machine(image, 0, vm="77" * 16), tmp_path, "another VM")   # marks are per VM


def test_the_vm_recovered_after_an_unconfirmed_commit_is_not_an_old_copy(tmp_path, image):
    """The whole path of `minivmm recover`: the source spent generation 1 (its
    TPM's counter and the migrated-away mark say 1), the commit was never
    confirmed, and the sealed recovery file holds the paused VM at generation
    1.  That VM, opened and saved again, restores here; a state saved before
    the migration (generation 0) does not."""
    tpm = SoftTpm.open(tmp_path / "tpm")
    m = machine(image, 0)
    m.run(max_ticks=2)
    before = m.save_state(ram=True).to_bytes()
    m.migration_identity = (VM, 1)                      # spent: both ends attested
    generation.accept(tpm, VM, 1)
    escrow = commit.escrow_keys(m, tpm)
    commit.destroy_keys(m)
    mark = commit.MigrationMark(tmp_path / "tpm", VM, 1)
    mark.prepare()
    mark.commit(1, "10.0.0.2:7000", escrow)
    path = commit.seal_recovery(m, tpm, escrow, tmp_path / "vm.sealed")
    recovered = Machine.restore(MachineState.from_bytes(commit.open_recovery(path, tpm), where="r"))
    assert recovered.migration_identity == (VM, 1)
    check_restore(recovered, tmp_path / "tpm", "the recovered VM")
    check_restore(recovered, tmp_path / "tpm", "the recovered VM", tpm=tpm)
    old = Machine.restore(MachineState.from_bytes(before, where="before"))
    with pytest.raises(OldCopy, match="marked migrated-away"):
        check_restore(old, tmp_path / "tpm", "the state saved before")


def test_a_host_with_no_mark_and_no_tpm_refuses_nothing(tmp_path, image):
    """A host that never ran a secure VMM (no TPM directory at all): nothing
    says any copy is old, and looking must not fail or create a TPM."""
    for where in (tmp_path / "none", tmp_path):
        check_restore(machine(image, 0), where, "a state")
    assert not (tmp_path / "none").exists() and not list(tmp_path.iterdir())


def test_the_tpm_handed_in_is_the_one_consulted(tmp_path, image):
    """A secure VMM checks against its own TPM handle (``SecureMode.hello_info``
    passes ``tpm=``), not whatever TPM files lie in the state directory: here
    the directory's TPM has never seen the VM, the VMM's own TPM has seen
    generation 5, so generation 3 is old."""
    SoftTpm.open(tmp_path / "dir")                      # a TPM in the directory, counter 0
    own = SoftTpm.open(tmp_path / "own")
    generation.accept(own, VM, 5)
    check_restore(machine(image, 3), tmp_path / "dir", "by the directory's TPM")
    with pytest.raises(OldCopy, match="has seen generation 5"):
        check_restore(machine(image, 3), tmp_path / "dir", "by its own TPM", tpm=own)
    check_restore(machine(image, 5), tmp_path / "dir", "current", tpm=own)


def test_the_state_directory_may_be_given_as_a_string(tmp_path, image):
    """``tpm_dir`` is ``Path | str`` (the CLI's default comes from the
    environment as text): both the mark and the TPM in it are found."""
    mark = commit.MigrationMark(tmp_path, VM, 2)
    mark.prepare()
    mark.close()
    with pytest.raises(OldCopy, match="marked pending"):
        check_restore(machine(image, 1), str(tmp_path), "old")
    mark.undo()
    generation.accept(SoftTpm.open(tmp_path), VM, 2)
    with pytest.raises(OldCopy, match="stale state: .* has seen generation 2"):
        check_restore(machine(image, 1), str(tmp_path), "old")
    check_restore(machine(image, 2), str(tmp_path), "current")
