"""tffpipe: TensorFlow Federated pipelines for mobile-style federated learning.

Install the environment from the lock first (see README), then this package with
`pip install --no-deps -e .`. The requirements below are the real direct needs, for
tools and readers; the exact versions that work together live in requirements.lock.
"""

import setuptools

setuptools.setup(
    name="tffpipe",
    version="0.1.0",
    description="TFF pipelines for mobile-style federated learning simulation",
    packages=setuptools.find_packages(include=["tffpipe", "tffpipe.*", "experiments"]),
    package_data={"tffpipe": ["_native/*.c"], "experiments": ["presets/*.flags"]},
    python_requires=">=3.9,<3.12",
    install_requires=[
        "tensorflow==2.14.1",
        "tensorflow-federated==0.87.0",
        "tensorflow-privacy==0.9.0",
        "dp-accounting==0.4.3",
        "keras==2.14.0",
        "numpy==1.25.2",
        "absl-py>=1.4",
        "Hershey-Fonts>=2.1",
        "symspellpy>=6.7",
        "matplotlib>=3.8",
    ],
)
