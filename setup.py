"""Build script: the pure-Python package plus ``hdkd_fast.kernels`` mapped from ``kernels/``.

Install with ``pip install --no-build-isolation .`` so the build uses the torch already installed
(build isolation would download a multi-GB CUDA torch; the GPU machines have no network).
The compiled extension ``hdkd_fast._C`` (``csrc/``) is added by the native-extension work.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["hdkd_fast", "hdkd_fast.*"]), "hdkd_fast.kernels"],
    package_dir={"hdkd_fast.kernels": "kernels"},
)
