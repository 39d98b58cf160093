"""The PKCS#11 URI of the master key's HSM key (RFC 7512, the subset testhide
takes), ``--master-key``'s two forms, where the PIN comes from, and the
wrapped ring's file format: parsing only, no module is loaded."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from testhide.controlplane.errors import ConfigError, IntegrityError
from testhide.controlplane.hsm import PIN_ENV, Pkcs11Uri, WrappedRing, master_key_choice

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
URI = f"pkcs11:token=testhide;object=master?module-path={MODULE}&pin-source=file:/etc/testhide/pin"


def test_a_full_uri_parses_and_prints_back_the_same() -> None:
    uri = Pkcs11Uri.parse(URI)
    assert uri == Pkcs11Uri("testhide", "master", Path(MODULE), Path("/etc/testhide/pin"))
    assert str(uri) == URI
    assert Pkcs11Uri.parse(str(uri)) == uri


def test_percent_encoding_is_decoded_and_written_back() -> None:
    uri = Pkcs11Uri.parse(f"pkcs11:token=ci%20hsm;object=key%3B1;serial=A1?module-path={MODULE}")
    assert (uri.token, uri.object, uri.serial, uri.pin_source) == ("ci hsm", "key;1", "A1", None)
    assert str(uri) == f"pkcs11:token=ci%20hsm;object=key%3B1;serial=A1?module-path={MODULE}"
    assert Pkcs11Uri.parse(str(uri)) == uri


def test_type_secret_key_and_a_bare_pin_path_are_accepted() -> None:
    uri = Pkcs11Uri.parse(f"PKCS11:token=t;object=k;type=secret-key?module-path={MODULE}&pin-source=/run/pin")
    assert uri.pin_source == Path("/run/pin")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("file:/x", "starts with 'pkcs11:'"),
        (f"pkcs11:object=k?module-path={MODULE}", "names no token"),
        (f"pkcs11:token=t?module-path={MODULE}", "names no object"),
        (f"pkcs11:token=t;object=?module-path={MODULE}", "names no object"),
        ("pkcs11:token=t;object=k", "names no module"),
        ("pkcs11:token=t;object=k?module-path=libsofthsm2.so", "must be absolute"),
        (f"pkcs11:token=t;object=k;id=%01?module-path={MODULE}", "'id' is not supported"),
        (
            f"pkcs11:token=t;object=k?module-path={MODULE}&module-name=softhsm2",
            "'module-name' is not supported",
        ),
        (f"pkcs11:token=t;token=u;object=k?module-path={MODULE}", "gives token twice"),
        (f"pkcs11:token=t;object=k;type=private?module-path={MODULE}", "must be secret-key"),
        (f"pkcs11:token=t%2;object=k?module-path={MODULE}", "bad percent-encoding"),
        (f"pkcs11:token=t%zz;object=k?module-path={MODULE}", "bad percent-encoding"),
        (f"pkcs11:token=t;object=k;?module-path={MODULE}", "where NAME=VALUE belongs"),
        (f"pkcs11:token=t;object=k?module-path={MODULE}&pin-source=file:pin", "absolute path"),
        (f"pkcs11:token=t;object=k?module-path={MODULE}&pin-source=|/bin/cat", "absolute path"),
    ],
)
def test_a_bad_uri_is_one_clear_line(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Pkcs11Uri.parse(text)
    message = str(caught.value)
    assert says in message
    assert "\n" not in message


def test_a_pin_in_the_uri_is_refused_and_never_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        Pkcs11Uri.parse(f"pkcs11:token=t;object=k?module-path={MODULE}&pin-value=s3cr3t-4711")
    assert "pin-source=file:" in str(caught.value)
    assert "s3cr3t-4711" not in str(caught.value)


def test_master_key_option_takes_a_file_or_a_uri_and_never_echoes_anything_else() -> None:
    assert master_key_choice(None) is None
    assert master_key_choice("") is None
    assert master_key_choice("file:/srv/ring.key") == Path("/srv/ring.key")
    assert master_key_choice(URI) == Pkcs11Uri.parse(URI)
    key = base64.b64encode(b"k" * 32).decode()
    for wrong in (key, "file:", "/srv/ring.key"):
        with pytest.raises(ConfigError, match="file:PATH or a pkcs11: URI") as caught:
            master_key_choice(wrong)
        assert key not in str(caught.value)


def test_the_pin_comes_from_its_file_before_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PIN_ENV, "from-env")
    pin = tmp_path / "pin"
    pin.write_text("from-file\n")
    pin.chmod(0o600)
    assert Pkcs11Uri("t", "k", Path(MODULE), pin).pin() == "from-file"
    assert Pkcs11Uri("t", "k", Path(MODULE)).pin() == "from-env"


def test_a_pin_file_others_can_read_or_a_missing_pin_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PIN_ENV, raising=False)
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o644)
    with pytest.raises(ConfigError, match="0600"):
        Pkcs11Uri("t", "k", Path(MODULE), pin).pin()
    with pytest.raises(ConfigError, match="0600"):
        Pkcs11Uri("t", "k", Path(MODULE), tmp_path / "absent").pin()
    with pytest.raises(ConfigError, match=f"no PIN for PKCS#11 token 't'.*{PIN_ENV}"):
        Pkcs11Uri("t", "k", Path(MODULE)).pin()


def test_the_wrapped_ring_round_trips_through_its_file_format() -> None:
    wrapped = WrappedRing(Pkcs11Uri.parse(URI), b"n" * 12, b"c" * 48)
    assert WrappedRing.decode(wrapped.encode(), "keyring.pkcs11") == wrapped
    assert WrappedRing.decode(wrapped.as_json(), "the header") == wrapped


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.pop("ring"),
        lambda d: d.update(nonce="not base64!"),
        lambda d: d.update(format=2),
        lambda d: d.update(uri="pkcs11:token=t"),
    ],
)
def test_a_damaged_ring_file_is_refused(change: Callable[[dict[str, Any]], object]) -> None:
    data = WrappedRing(Pkcs11Uri.parse(URI), b"n" * 12, b"c" * 48).as_json()
    change(data)
    with pytest.raises((IntegrityError, ConfigError)):
        WrappedRing.decode(json.dumps(data).encode(), "keyring.pkcs11")
    with pytest.raises(IntegrityError, match=r"keyring\.pkcs11 is damaged"):
        WrappedRing.decode(b"{not json", "keyring.pkcs11")
