"""Package layout: `peftfast/` is the library, `kernels/` installs as `peftfast.kernels`.

Nothing is compiled yet; the optional CUDA extension (`csrc/`, built as `peftfast._C`) will be added here
behind a check for a CUDA toolchain, so that this file keeps working on machines without one.
"""

from setuptools import find_packages, setup

library_packages = find_packages(include=["peftfast", "peftfast.*"])
kernel_packages = ["peftfast.kernels"] + [f"peftfast.kernels.{name}" for name in find_packages(where="kernels")]

setup(
    packages=library_packages + kernel_packages,
    package_dir={"peftfast.kernels": "kernels"},
)
