"""Declares the optional C extension batpak_mp._native._codec; pyproject.toml holds everything else.

``optional=True``: a machine without a C compiler still installs the pure package, and
batpak_mp._native then reports the "python" backend (BATPAK_MP_REQUIRE_NATIVE=1 makes that
an ImportError instead, for CI). The C source needs only libc and the Python headers.
The source's SHA-256 is compiled in, so the loader can tell a build that no longer
matches its source (a failed optional rebuild leaves the old one in place) and refuse it.
"""

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "batpak_mp/_native/_codec.c"
SOURCE_SHA256 = hashlib.sha256(Path(__file__).with_name("batpak_mp").joinpath("_native", "_codec.c").read_bytes()).hexdigest()

setup(
    ext_modules=[
        Extension(
            "batpak_mp._native._codec",
            sources=[SOURCE],
            define_macros=[("BATPAK_MP_CODEC_SHA256", f'"{SOURCE_SHA256}"')],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=c11"],
            optional=True,
        ),
    ],
)
