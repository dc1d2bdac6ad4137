"""Error messages quote user values as bounded excerpts, whatever the value."""

import time

from quantkit.errors import clip, excerpt


def _alias_bomb(levels: int) -> list:
    """What ``yaml.safe_load`` builds from nested anchors: 9 shared references per level (its
    full repr at 10 levels would be ~20 GB)."""
    node = ["lol"] * 9
    for _ in range(levels):
        node = [node] * 9
    return node


def test_excerpt_of_a_shared_reference_bomb_is_short_and_instant():
    t0 = time.perf_counter()
    text = excerpt(_alias_bomb(10))
    assert time.perf_counter() - t0 < 0.1
    assert len(text) <= 60 and text.startswith("[[[") and "\n" not in text


def test_excerpt_names_integers_python_cannot_print():
    assert excerpt(16 ** 5000) == "<an integer of 20001 bits>"  # repr() raises past 4300 digits
    assert excerpt(-3) == "-3" and excerpt(True) == "True" and excerpt("bits") == "'bits'"


def test_excerpt_of_long_strings_and_keys_is_cut():
    assert len(excerpt("x" * 10**6, 40)) <= 40
    assert len(excerpt({"k" * 10**5: ["v" * 10**5] * 10**3})) <= 60


def test_clip_makes_one_short_line():
    assert clip("a\nb") == "a b"
    text = clip("word\n" * 10**6)
    assert len(text) == 200 and text.endswith("...") and "\n" not in text
