"""The membership prediction service's entry point (the app itself is bikeshare_membership/app.py).

gunicorn --config gunicorn.conf.py        # serves `predict:app()`, the factory gunicorn.conf.py names
python predict.py                         # the same app in Flask's debug server, on the same port
"""

from __future__ import annotations

from flask import Flask

from bikeshare_membership.app import serve_app, start_serving


def app() -> Flask:
    """The app factory Gunicorn calls (`predict:app()`): JSON logs, the Production model loaded once."""
    return serve_app()


if __name__ == "__main__":
    debug_app = serve_app()
    start_serving(debug_app)
    debug_app.run(host="0.0.0.0", port=debug_app.extensions["settings"].port, debug=True)
