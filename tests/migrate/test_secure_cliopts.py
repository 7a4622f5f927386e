"""The secure protocol's command-line options (``migrate/secure/cliopts.py``),
called the way ``migrate/cli.py`` calls them, in the test process (the CLI tests
run them in child processes only).  Issue 19: what a wrong default or a dropped
switch here would do is run a VMM with fewer defences than it says."""

import argparse

import pytest

from migrate.measure import measure_start
from migrate.secure import cliopts
from migrate.secure.channel import SealedChannel
from migrate.secure.mode import INSECURE, PlainMode, SecureMode
from migrate.secure.setup import protection_policy, setup
from migrate.wire import Channel


def parse(*argv):
    p = argparse.ArgumentParser()
    cliopts.add_options(p)
    return p.parse_args(list(argv))


def test_the_options_and_their_defaults():
    a = parse()
    assert (a.plain, a.insecure, a.issuer, a.attest_policy) == (False, [], None, None)
    a = parse("--plain", "--issuer", "i", "--attest-policy", "p.json")
    assert (a.plain, a.issuer, a.attest_policy) == (True, "i", "p.json")
    assert parse("--insecure", "toctou", "--insecure", "replay").insecure == ["toctou", "replay"]
    with pytest.raises(SystemExit):
        parse("--insecure", "everything")           # only the named defences


def test_plain_and_insecure_together_are_refused_and_each_alone_is_fine():
    with pytest.raises(ValueError, match="with --plain there are none"):
        cliopts.check(parse("--plain", "--insecure", "replay"))
    cliopts.check(parse("--plain"))
    cliopts.check(parse("--insecure", "replay"))
    cliopts.check(argparse.Namespace())             # a command without these options
    cliopts.check(argparse.Namespace(insecure=["replay"]))      # one with --insecure but no --plain


def test_the_default_is_secure_and_the_announcement_names_every_defence_off():
    assert cliopts.mode_name(parse()) == "secure" and cliopts.mode_name(argparse.Namespace()) == "secure"
    assert cliopts.mode_name(parse("--plain")) == "plain"
    assert cliopts.announce(parse("--plain")) == "migration mode: PLAIN (no attestation, no encryption)"
    assert cliopts.announce(parse()).startswith("migration mode: secure (attestation")
    said = cliopts.announce(parse("--insecure", "toctou", "--insecure", "replay", "--insecure", "toctou"))
    assert said.startswith("migration mode: secure, BUT INSECURE: defence(s) OFF: replay, toctou --")


def test_trust_files_default_under_the_tpm_state_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("MINIVMM_TPM_STATE", raising=False)
    assert cliopts.base_dir() == cliopts.Path(".minivmm-tpm")
    monkeypatch.setenv("MINIVMM_TPM_STATE", str(tmp_path))
    assert cliopts.issuer_path(parse()) == tmp_path / "issuer"
    assert cliopts.policy_path(parse()) == tmp_path / "policy.json"
    assert cliopts.issuer_path(parse("--issuer", "x")) == cliopts.Path("x")
    assert cliopts.policy_path(parse("--attest-policy", "y")) == cliopts.Path("y")


def test_each_mode_gets_its_own_channel_with_exactly_the_defences_asked_for():
    assert cliopts.channel_factory(parse("--plain"), "source") is Channel
    import socket
    a, b = socket.socketpair()
    try:
        for argv, enc, rep in [((), True, True), (("--insecure", "encryption"), False, True),
                               (("--insecure", "replay"), True, False),
                               (("--insecure", "toctou"), True, True)]:
            ch = cliopts.channel_factory(parse(*argv), "destination")(a, 3.0)
            assert isinstance(ch, SealedChannel)
            assert (ch.role, ch.encryption, ch.check_sequence, ch.timeout) == ("destination", enc, rep, 3.0)
    finally:
        a.close()
        b.close()


def test_a_secure_start_needs_the_trust_files_then_measures_them(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIVMM_TPM_STATE", str(tmp_path / "none"))
    assert cliopts.prepare(parse("--plain"), tmp_path / "tpm") is None
    assert isinstance(cliopts.session_mode(parse("--plain"), tmp_path / "tpm"), PlainMode)
    with pytest.raises(ValueError, match="missing: .*issuer.*policy.json"):
        cliopts.prepare(parse(), tmp_path / "tpm")

    issuer, policy = setup(tmp_path / "trust")
    measure_start(tmp_path / "tpm", {"role": "source"}, protection_policy())
    args = parse("--issuer", str(issuer), "--attest-policy", str(policy), "--insecure", "replay")
    said = cliopts.prepare(args, tmp_path / "tpm")
    assert said.startswith("measured trust settings into PCR 10") and len(args.trust_digest) == 32
    from tpm import SoftTpm
    assert SoftTpm.open(tmp_path / "tpm", startup=None, create=False).ak_certificate is not None
    mode = cliopts.session_mode(args, tmp_path / "tpm")
    assert isinstance(mode, SecureMode) and mode.insecure == {"replay"}
    assert mode.attestor.trust == args.trust_digest
    assert set(INSECURE) >= mode.insecure


def test_attest_setup_approves_the_secure_build_and_each_defence_asked_for(tmp_path, capsys):
    from migrate.secure.setup import make_policy
    from migrate.secure import trust
    from tpm import AttestationPolicy, Issuer
    p = argparse.ArgumentParser()
    cliopts.add_setup_command(p.add_subparsers())
    a = p.parse_args(["attest-setup", "--dir", str(tmp_path), "--approve-insecure", "toctou"])
    assert a.func(a) == 0
    assert "approves this build, secure; and with --insecure toctou" in capsys.readouterr().out
    key = Issuer.load(tmp_path / "issuer").public_key
    want = trust.approve(make_policy(({}, {"insecure": ("toctou",)})), key)
    assert AttestationPolicy.load(tmp_path / "policy.json") == want


def test_recover_needs_this_hosts_existing_tpm_and_makes_none(tmp_path):
    """A recovery file opens only under the TPM it was sealed to: with no TPM state
    in --tpm-dir, recover refuses and does not make a fresh TPM there."""
    p = argparse.ArgumentParser()
    cliopts.add_recover_command(p.add_subparsers())
    a = p.parse_args(["recover", str(tmp_path / "vm.sealed"), "--tpm-dir", str(tmp_path / "tpm")])
    assert a.save_state is None                     # run_guest reads it: no state saved unless asked
    with pytest.raises(ValueError, match="this host's TPM refuses to open"):
        a.func(a)
    assert not (tmp_path / "tpm").exists()
    # --save-state (the recovered guest's final state, its keys sealed again) is an option
    # of recover (issue 19: the option dropped passed every test)
    a = p.parse_args(["recover", "vm.sealed", "--save-state", str(tmp_path / "after.mvstate")])
    assert (a.file, a.tpm_dir, a.save_state) == ("vm.sealed", None, str(tmp_path / "after.mvstate"))


def _sealed_after_an_unconfirmed_commit(tmp_path):
    """A host TPM and the recovery file a source seals after an unconfirmed secure
    commit (keys escrowed to its TPM, then destroyed): (TPM dir, file, machine)."""
    from guests.build import Program, build_image
    from migrate.secure import commit, generation
    from minivmm.machine import Machine
    from tpm import SoftTpm

    from securehelp import Trust

    tpm_dir = Trust(tmp_path).host("a")
    tpm = SoftTpm.open(tpm_dir, startup=None, create=False)
    m = Machine(build_image([Program.builtin("keeper", data_pages=3, args=(30, 1)),
                             Program.builtin("counter", args=(30, 150_000))], name="k"))
    m.run(max_ticks=6)
    m.migration_identity = (generation.new_identity(), 1)
    escrow = commit.escrow_keys(m, tpm)
    commit.destroy_keys(m)
    return tpm_dir, commit.seal_recovery(m, tpm, escrow, tmp_path / "vm.sealed"), m


def test_recover_runs_the_sealed_guest_on_and_saves_it_with_its_keys_sealed_again(tmp_path, capsys):
    """``minivmm recover FILE --save-state OUT``, called as the CLI calls it: the
    guest comes back with its process keys from this host's TPM, runs (its console
    on stdout), and the state saved at the bound seals those keys to the TPM again
    -- a file without the TPM gives no key (issue 19: the recovered guest's run,
    its console, its exit status and the keys' wrap, each dropped, passed every
    test; only a slow child-process test ran recover)."""
    from migrate.cli import EXIT_BOUND
    from migrate.secure.statekeys import TpmKeyWrap
    from minivmm.errors import StateError
    from minivmm.machine import Machine

    tpm_dir, path, sealed = _sealed_after_an_unconfirmed_commit(tmp_path)
    p = argparse.ArgumentParser()
    cliopts.add_recover_command(p.add_subparsers())
    out = tmp_path / "after.mvstate"
    a = p.parse_args(["recover", str(path), "--tpm-dir", str(tpm_dir), "--save-state", str(out)])
    a.until_tick = sealed.ticks + 4         # run_guest's bound (run --until-tick): the keeper still holds its key
    assert a.func(a) == EXIT_BOUND
    assert "secret intact" in capsys.readouterr().out       # the recovered guest's console, live
    with pytest.raises(StateError, match="sealed"):
        Machine.load(out)                                   # no key without this host's TPM
    back = Machine.load(out, unwrap=TpmKeyWrap(tpm_dir))
    assert back.ticks == sealed.ticks + 4 and back.protection._keys
    back.run(max_ticks=100_000)
    assert back.exits == {1: 0, 2: 0} and back.console.text(1).count("secret intact") == 30


def test_a_secure_start_trusting_only_the_issuers_public_key_certifies_nothing(tmp_path):
    """The second machine of a two-machine setup holds only ``issuer.pub.pem``
    (its AK was certified where the issuer's private key is): ``prepare`` then
    certifies nothing -- the TPM keeps the certificate it had, or has none -- and
    still measures the trust files (issue 19: the fallback for an issuer
    directory without its private key, dropped, passed every test; it then
    failed with an UnboundLocalError)."""
    import shutil

    from migrate.secure.setup import certify
    from tpm import SoftTpm

    issuer, policy = setup(tmp_path / "trust")
    public = tmp_path / "public"
    public.mkdir()
    shutil.copy(issuer / "issuer.pub.pem", public)
    for host, certified in (("elsewhere", True), ("never", False)):
        tpm_dir = tmp_path / host
        measure_start(tpm_dir, {"role": "source"}, protection_policy())
        if certified:
            certify(tpm_dir, issuer)
        before = SoftTpm.open(tpm_dir, startup=None, create=False).ak_certificate
        args = parse("--issuer", str(public), "--attest-policy", str(policy))
        assert cliopts.prepare(args, tpm_dir).startswith("measured trust settings into PCR 10")
        assert len(args.trust_digest) == 32
        assert SoftTpm.open(tpm_dir, startup=None, create=False).ak_certificate == before
        assert (before is not None) == certified

