"""Run a WSGI app as a single-threaded FastCGI child: `fcgipool serve --wsgi pkg.mod:app`.

The pool starts ``python -m fcgipool.wsgi pkg.mod:app`` as each child; flup 1.0.3's
single-threaded server takes fd 0, the listening socket the pool passes, like any FastCGI
program. (flup 1.0.3, not flup6 1.1.1, which hangs when SERVER_NAME/PORT/PROTOCOL are
missing.) The child's working directory is put first on sys.path so that a module next to
the config can be named.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication


def load(target: str) -> WSGIApplication:
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise SystemExit(f"fcgipool.wsgi: {target!r} is not MODULE:ATTRIBUTE")
    module = importlib.import_module(module_name)
    app: object = module
    for part in attribute.split("."):
        app = getattr(app, part)
    return cast("WSGIApplication", app)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m fcgipool.wsgi MODULE:APP")
    sys.path.insert(0, os.getcwd())
    app = load(args[0])
    from flup.server.fcgi_single import WSGIServer  # type: ignore[import-untyped]

    WSGIServer(app).run()


if __name__ == "__main__":
    main()
