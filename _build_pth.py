"""Build step (setuptools ``cmdclass``) that ships ``hf_mousse_autoregister.pth`` into site-packages.

A ``.pth`` file must sit at the top of site-packages for Python's ``site`` module to run it. A regular
wheel gets it from the top of ``build_lib`` (bdist_wheel installs all of build_lib). An editable install
(``pip install -e .``, what ``make install`` does) never installs build_lib, nor data files (setuptools
skips them in editable mode), so there the file is written into the editable wheel's own root, which is
the install command's ``install_lib`` during an editable build. tests/test_autoregister.py builds both
kinds of wheel and checks. This module is used at build time only and is not installed.
"""

from __future__ import annotations

import os

from setuptools.command.build_py import build_py

PTH = "hf_mousse_autoregister.pth"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH)


class build_py_with_pth(build_py):  # noqa: N801 (setuptools' command naming)
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        os.makedirs(target, exist_ok=True)
        self.copy_file(SOURCE, os.path.join(target, PTH))
