"""The command line of the host-read checker: ``python -m graphrt.check --model wan-tiny [--reference]``
or ``python -m graphrt.check path/to/file.py:factory``.

This module is the CLI only; the function ``graphrt.check`` is exported from the package (it lives
in :mod:`graphrt.capture.hostreads`, with the CLI's logic). Do not ``import graphrt.check``: the
import would bind this module over the function ``graphrt.check``.
"""
from graphrt.capture.hostreads import main

if __name__ == "__main__":
    raise SystemExit(main())
