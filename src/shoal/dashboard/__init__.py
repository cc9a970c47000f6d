"""The web dashboard of a detached instance, served by the admin API (`shoal dashboard` opens it).

`auth.py` lets a browser in without the long-lived token in its history, `snapshot.py` gathers what
the page shows into one JSON document, `web.py` holds the routes, `static/` the page itself (plain
HTML, CSS and a little JavaScript; no build step, nothing fetched from elsewhere).
"""
