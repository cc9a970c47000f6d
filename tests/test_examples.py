"""The examples run as they stand."""

from __future__ import annotations

from shoal import serve


def test_composition_example(serve_app):
    from examples.composition import app

    answer = serve.run(app).remote("what do fish eat?").result()
    assert "Fish eat plankton" in answer
