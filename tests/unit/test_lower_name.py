"""lower_name: field names lower-cased once, shared, within bounds a client cannot inflate."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pibl.http import head
from pibl.http.head import lower_name


@given(st.binary(max_size=80))
def test_it_is_bytes_lower(name: bytes) -> None:
    assert lower_name(name) == name.lower()


def test_one_shared_object_per_name_whatever_its_case() -> None:
    first = lower_name(b"X-Shared-Name-Test")
    assert lower_name(b"-".join([b"X", b"Shared", b"Name", b"Test"])) is first  # another object
    assert lower_name(b"x-shared-name-test") is first


def test_long_names_are_lowered_but_never_kept() -> None:
    size = len(head._LOWER)
    for i in range(100):
        name = b"X-" + b"A" * 200 + str(i).encode()
        assert lower_name(name) == name.lower()
    assert len(head._LOWER) == size
