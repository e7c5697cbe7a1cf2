"""k15: the Kimi k1.5 reinforcement-learning recipe in JAX (arXiv 2501.12599)."""

import setuptools

setuptools.setup(
    name="k15",
    version="0.1.0",
    description="Long chain-of-thought RL (Kimi k1.5 recipe) in JAX/Flax, from one CPU to a TPU pod",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["k15", "k15.*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        "tensorboardX>=2.6",
        "numpy>=1.26",
        "ml-dtypes>=0.5",
        "absl-py>=2.1",
        "tqdm>=4.66",
        "math-verify[antlr4_13_2]>=0.7",
        "matplotlib>=3.8",
        "etils[epath]>=1.7",  # every workdir path (local or gs://)
        "fsspec>=2024.2",
    ],
    extras_require={
        # Reference comparisons against transformers/PyTorch; torch>=2.4 is satisfied by the
        # CPU build CI installs first (see .ci/run).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch>=2.4", "transformers>=4.45", "safetensors>=0.4",
                 "psutil>=5.9", "scipy>=1.11", "nbclient>=0.10", "ipykernel>=6.29"],
        # gs:// workdirs and checkpoints: etils.epath reads them through fsspec's gcsfs.
        "tpu": ["jax[tpu]>=0.7", "gcsfs>=2024.2"],
        "hf": ["transformers>=4.45", "safetensors>=0.4"],
    },
)
