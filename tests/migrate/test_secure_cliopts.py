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
