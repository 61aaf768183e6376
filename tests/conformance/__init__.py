"""Conformance suite: one contract (DESIGN.md §1), run against the in-process ``bp.Engine``
and a served ``bp.Store``.

This folder is a package on purpose: its ``conftest.py`` is then imported as
``conformance.conftest`` and does not replace the root ``tests/conftest.py`` in
``sys.modules["conftest"]``, which every other folder imports (``from conftest import
assert_verified``). Without this file, collecting this folder first would break them.
"""

import pytest

pytest.register_assert_rewrite("conformance._contract")  # its shape and error checks report diffs
