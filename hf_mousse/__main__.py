"""``python -m hf_mousse SCRIPT.py ARGS...`` (see :mod:`hf_mousse.cli`)."""

import sys

from .cli import module_main

module_main(sys.argv[1:])
