"""The Python API's defaults for people who call it interactively (ecosystem audit F8): a call of
several minutes shows a progress bar where someone is watching, and nothing in logs or pipes."""

import io

from quantkit import api


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_when_watched_silence_otherwise(stories, calib_ids, monkeypatch):
    model, _ = stories
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert api.default_progress() is None  # a pipe or a log: nothing
    err = _Tty()
    monkeypatch.setattr("sys.stderr", err)
    api.compress(model, "rtn", {"bits": 4, "group_size": -1})
    text = err.getvalue()
    assert "quantkit" in text and "5/5" in text and "block" in text  # stories260K has 5 blocks


def test_progress_false_is_silent_and_a_callable_is_called(stories, calib_ids, monkeypatch):
    model, _ = stories
    err = _Tty()
    monkeypatch.setattr("sys.stderr", err)
    api.compress(model, "rtn", {"bits": 4, "group_size": -1}, progress=False)
    assert err.getvalue() == ""
    seen = []
    model2, _ = api.load_model("tests/fixtures/stories260K")
    api.compress(model2, "gptq", {"bits": 4, "group_size": -1}, calib_ids=calib_ids[:2],
                 progress=lambda i, n, info: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(1, 6)] and err.getvalue() == ""
