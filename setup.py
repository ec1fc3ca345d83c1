"""adapter-jax: Houlsby et al. (2019) adapters for BERT in JAX/Flax."""

import pathlib

import setuptools

setuptools.setup(
    name="adapter-jax",
    version="0.1.0",
    description="Parameter-efficient transfer learning for NLP (Houlsby et al., 2019) in JAX/Flax.",
    long_description=pathlib.Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["adapter_jax", "adapter_jax.*"]),
    # Current JAX, flax and orbax need 3.11; on 3.10 pip would quietly pick releases the tests never ran.
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "etils[epath]",  # paths that may be gs:// (workdirs, exports, results)
        "ml_collections>=0.1.1",
        "absl-py>=2.0",
        "numpy>=1.26",
        "safetensors>=0.4",
        "transformers>=4.40",  # tokenizers only; the model is ours
        "tokenizers>=0.19",
        "huggingface_hub>=0.23",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # torch is pinned to the CPU build: a plain `torch` requirement pulls a multi-GB CUDA build.
        "test": [
            "pytest>=8",
            "torch==2.13.0",
            "scikit-learn>=1.4",
            "scipy>=1.11",
            "hypothesis>=6.100",
            # Reads glue/* through tfds.data_source and tfds.testing.mock_data: no TensorFlow needed.
            "tensorflow-datasets>=4.9.7",
            "matplotlib>=3.8",
            # A real Cloud Storage server for the gs:// workdir tests, and the client epath reaches it with.
            "gcp-storage-emulator>=2024.8.3",
            "gcsfs>=2024.2.0",
        ],
        "tfds": ["tensorflow-datasets>=4.9.7"],
        # gcsfs (checkpoints, exports, results) and google-cloud-storage (TensorBoard events) let the
        # workdir be a gs:// bucket.
        "tpu": ["jax[tpu]", "gcsfs", "google-cloud-storage"],
        # NVIDIA GPUs: the CUDA 12 jaxlib plugin and its CUDA libraries from PyPI; without it a GPU machine
        # silently runs the CPU jaxlib.
        "cuda": ["jax[cuda12]"],
        "report": ["matplotlib>=3.8"],
    },
    entry_points={"console_scripts": ["adapter-jax=adapter_jax.main:run"]},
)
