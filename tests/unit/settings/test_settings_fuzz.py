"""Both config parsers against hostile files: whatever a settings or fleet file holds, only
`ConfigError` comes out, and whatever parses can be used (decided on, written back).

The documents (`tests.config_fuzz`) are trees of hostile values, valid files with one
value replaced or one key added (so the fuzzing reaches past the first key), and
arbitrary bytes.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from donor_app.domain.fleet import FleetPolicy, clamp, locked_fields
from donor_app.domain.policy import Since, decide, track
from donor_app.domain.readings import ActivityReading, HostReading
from donor_app.domain.settings import Settings
from donor_app.settings.config import (
    ConfigError,
    LinkConfig,
    dump_settings,
    load_fleet,
    load_link_config,
    load_settings,
    parse_settings,
)
from tests.config_fuzz import (
    FLEET,
    NOW,
    OWNER,
    PEM,
    WORST,
    at,
    documents,
    hostile,
    keys,
    places,
    prepare,
    replaced,
    shown_value,
    tables,
    toml,
)

_T = TypeVar("_T")


# --- what must hold ------------------------------------------------------------------------


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    """The files the documents name."""
    prepare(tmp_path)
    return tmp_path


def _only_config_errors(load: Callable[[], _T]) -> _T | None:
    try:
        return load()
    except ConfigError:
        return None


def _usable(settings_in_force: Settings | None, fleet: FleetPolicy | None) -> None:
    """What the agent does with parsed files: write the settings back, decide on them."""
    owner = settings_in_force or Settings()
    policy = fleet or FleetPolicy()
    if settings_in_force is not None:
        again = parse_settings(tomllib.loads(dump_settings(owner)), Path("again"), now=NOW)
        assert again == owner
    clamp(owner, policy)
    locked_fields(owner, policy)
    host = HostReading(owner_cpu_percent=90.0, total_memory_mib=16384, cpu_count=8)
    for last_input in (None, NOW - timedelta(seconds=5)):
        activity = ActivityReading(last_input, 3)
        since = Since()
        for now in (NOW, NOW + timedelta(minutes=30)):  # long enough to escalate
            since = track(since, now, owner, activity, host)
            decide(now, owner, policy, activity, host, since)


def _check(file: Path) -> None:
    owner = _only_config_errors(lambda: load_settings(file, now=NOW))
    fleet = _only_config_errors(lambda: load_fleet(file))
    link = _only_config_errors(lambda: load_link_config(file))
    assert link is None or isinstance(link, LinkConfig)
    _usable(owner, fleet)


FUZZ = settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(documents)
def test_no_document_lets_another_exception_out(
    directory: Path, document: dict[str, object]
) -> None:
    file = directory / "fuzzed.toml"
    file.write_bytes(toml(document, directory))
    _check(file)


PLACES = [(base, place) for base in (OWNER, FLEET) for place in places(base)]
PLACE_IDS = [".".join(map(str, place)) for _, place in PLACES]


@pytest.mark.parametrize(("base", "place"), PLACES, ids=PLACE_IDS)
def test_each_value_of_a_valid_file_replaced_by_the_worst_lets_no_other_exception_out(
    directory: Path, base: dict[str, object], place: tuple[str | int, ...]
) -> None:
    escaped = []
    for value in WORST:
        document = replaced(base, place, value)
        assert isinstance(document, dict)
        file = directory / "worst.toml"
        file.write_bytes(toml(document, directory))
        try:
            _check(file)
        except Exception as error:  # every escape is collected, then reported at once
            escaped.append(f"{shown_value(value)}: {type(error).__name__}: {error}"[:200])
    assert not escaped, "\n".join(escaped)


@pytest.mark.parametrize(("base", "place"), PLACES, ids=PLACE_IDS)
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_each_value_of_a_valid_file_replaced_lets_no_other_exception_out(
    directory: Path, base: dict[str, object], place: tuple[str | int, ...], data: st.DataObject
) -> None:
    document = replaced(base, place, data.draw(hostile(place[-1]), label="value"))
    assert isinstance(document, dict)
    file = directory / "mutant.toml"
    file.write_bytes(toml(document, directory))
    _check(file)


@FUZZ
@given(data=st.data())
def test_a_key_added_to_a_valid_file_lets_no_other_exception_out(
    directory: Path, data: st.DataObject
) -> None:
    base = data.draw(st.sampled_from([OWNER, FLEET]), label="base")
    where = data.draw(st.sampled_from(tables(base)), label="table")
    table = at(base, where)
    assert isinstance(table, Mapping)
    key = data.draw(keys, label="key")
    document = replaced(base, where, {**table, key: data.draw(hostile(key), label="value")})
    assert isinstance(document, dict)
    file = directory / "added.toml"
    file.write_bytes(toml(document, directory))
    _check(file)


@FUZZ
@given(st.binary(max_size=2000) | st.binary(max_size=40).map(lambda b: b"a = " + b))
def test_no_bytes_let_another_exception_out(directory: Path, content: bytes) -> None:
    file = directory / "bytes.toml"
    file.write_bytes(content)
    _check(file)


def test_the_valid_files_the_fuzzing_starts_from_parse(directory: Path) -> None:
    """The files above start from files that parse: their errors come from the value
    replaced or added, not from a broken base."""
    file = directory / "owner.toml"
    file.write_bytes(toml(OWNER, directory))
    settings_read = load_settings(file, now=NOW)
    assert settings_read.schedule[1].caps is not None
    file.write_bytes(toml(FLEET, directory))
    assert load_fleet(file).max_memory_mib == 16384
    link = load_link_config(file)
    assert link is not None
    assert (link.token, link.ca_pem, link.migration is not None) == (
        "dtk_abc_def",
        PEM.encode(),
        True,
    )
    _usable(settings_read, load_fleet(file))
