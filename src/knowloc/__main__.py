"""``python -m knowloc ...``: the ``knowloc`` command (:func:`knowloc.cli.main`)."""

from __future__ import annotations

from knowloc.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
