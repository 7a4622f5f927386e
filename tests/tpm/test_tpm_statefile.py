"""The state-file envelope: size, magic, version, length and checksum/MAC checked first."""

import pytest

from tpm import statefile
from tpm.errors import CorruptStateError

MAGIC, VERSION = 0x54455354, 3


def test_round_trip_checksum_and_mac(tmp_path):
    p = tmp_path / "f.bin"
    statefile.write(p, MAGIC, VERSION, b"payload")
    assert statefile.read(p, MAGIC, VERSION, 100) == b"payload"
    statefile.write(p, MAGIC, VERSION, b"payload", mac_key=b"k" * 32)
    assert statefile.read(p, MAGIC, VERSION, 100, mac_key=b"k" * 32) == b"payload"
    with pytest.raises(CorruptStateError, match="MAC"):
        statefile.read(p, MAGIC, VERSION, 100, mac_key=b"j" * 32)


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "too short"),
        (statefile.encode(MAGIC, VERSION, b"x" * 101), "too large"),
        (statefile.encode(MAGIC + 1, VERSION, b"x"), "bad magic"),
        (statefile.encode(MAGIC, VERSION + 1, b"x"), "version"),
        (statefile.encode(MAGIC, VERSION, b"xy")[:-1] + b"\x00\x00", "length"),
        (statefile.encode(MAGIC, VERSION, b"xy")[:-1] + b"\x00", "checksum"),
    ],
)
def test_rejections_name_the_file(tmp_path, data, reason):
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    with pytest.raises(CorruptStateError, match=reason) as e:
        statefile.read(p, MAGIC, VERSION, 100)
    assert e.value.path == p


def test_missing_file(tmp_path):
    with pytest.raises(CorruptStateError, match="missing"):
        statefile.read(tmp_path / "nope", MAGIC, VERSION, 100)
