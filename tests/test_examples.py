"""The examples run as they stand."""

from __future__ import annotations

from shoal import serve


def test_composition_example(serve_app):
    from examples.composition import app

    answer = serve.run(app).remote("what do fish eat?").result()
    assert "Fish eat plankton" in answer


def test_composition_example_over_http(serve_app):
    import httpx

    from examples.composition import app
    from shoal.api import get_http_url

    serve.run(app)
    r = httpx.get(get_http_url() + "/", params={"query": "what do fish eat?"})
    assert r.status_code == 200 and "Fish eat plankton" in r.text

