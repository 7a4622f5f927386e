"""The attack menu's contents: the defence switches of the secure protocol
(``--insecure DEFENCE``) and a registry of attack scenarios.

Scenarios plug in with :func:`register` (a name, one line saying what it
does, and ``apply(scenario) -> scenario``, which returns the live scenario to
replay with the attack on).  The network attacks of the migration attack lab
(``migrate/lab/attacks.py``, ``minivmm mitm --attack``) are registered here:
each replays the scenario with the lab's man in the middle between A and B,
in the current mode (choose plain or a defence off first, then the attack, to
see the damage; in secure mode, to see where it is caught).  The lab's
standalone and host attacks (replay-stream, impersonate, toctou, rollback,
...) need VMM processes of their own: ``minivmm lab NAME``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from migrate.secure.mode import INSECURE

DEFENCES = {
    "attestation": "no TPM quotes are checked: any VMM is trusted",
    "encryption": "records travel in clear (still authenticated)",
    "toctou": "keys released without a fresh quote at the end",
    "replay": "sequence numbers and page versions not checked",
    "ordering": "COMMIT obeyed without the session's commit token",
}


@dataclass(frozen=True)
class AttackScenario:
    name: str
    summary: str
    apply: Callable


SCENARIOS: dict[str, AttackScenario] = {}


def register(name: str, summary: str, apply: Callable) -> None:
    SCENARIOS[name] = AttackScenario(name, summary, apply)


def _register_network_attacks() -> None:
    from migrate.lab.attacks import ATTACKS
    for name, cls in ATTACKS.items():
        if name in ("none", "forward"):
            continue
        register(name, cls.summary, lambda base, name=name: replace(base, attack=name))


_register_network_attacks()


def menu() -> list[tuple[str, str]]:
    """(key, label) entries: every defence switch, then every registered attack."""
    out = [("secure", "secure, every defence on"), ("plain", "plain mode (no attestation, no encryption)")]
    out += [(f"insecure:{d}", f"defence OFF: {d} -- {DEFENCES.get(d, '')}") for d in INSECURE]
    out += [(f"attack:{a.name}", f"attack: {a.name} -- {a.summary}") for a in SCENARIOS.values()]
    return out


def scenario_for(key: str, base):
    if key == "secure":
        return replace(base, plain=False, insecure=(), attack=None)
    if key == "plain":
        return replace(base, plain=True, insecure=(), attack=None)
    if key.startswith("insecure:"):
        return replace(base, plain=False, insecure=(key.split(":", 1)[1],), attack=None)
    if key.startswith("attack:"):
        return SCENARIOS[key.split(":", 1)[1]].apply(base)
    raise KeyError(key)
