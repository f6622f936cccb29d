"""Field paths in words (pure)."""

from __future__ import annotations

from donor_app.gui.field_names import describe, explain


def test_paths_in_words() -> None:
    assert describe("caps.idle.cpu_percent") == "Limits › while the computer is idle › CPU %"
    assert describe("schedule[1].caps.in_use.memory_mib") == (
        "Schedule window 2 › Limits › while you use the computer › memory MiB"
    )
    assert describe("schedule[0].end") == "Schedule window 1 › end"
    assert describe("unknown_key") == "unknown key"


def test_messages_name_the_field_in_words_and_as_the_key() -> None:
    assert explain("idle_after: must be ≥ 0 seconds, got -5") == (
        "Idle after (idle_after): must be ≥ 0 seconds, got -5"
    )
    assert explain("no field here") == "no field here"
    assert explain("two words: then a colon") == "two words: then a colon"
