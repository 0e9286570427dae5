"""The operations console: server-rendered pages, a JSON API and Prometheus metrics, served by ``serve``.

``app.py`` builds the ASGI application and runs it (Uvicorn in a thread), ``auth.py`` logs users in
(argon2 passwords or a reverse proxy's header, signed session cookies, CSRF tokens, roles),
``queries.py`` reads what the pages and the API show from the database, ``pages.py`` and ``api.py``
are the routes, ``metrics.py`` computes Prometheus metrics from the database at scrape time, and
``probe.py`` C-ECHOes the destinations.
"""
