"""Package `moe`: a JAX/Flax (NNX) Mixture-of-Experts pretraining stack."""

from setuptools import find_packages, setup

setup(
    name='moe',
    version='0.1.0',
    description='Mixture-of-Experts language-model pretraining in JAX/Flax NNX',
    packages=find_packages(include=['moe', 'moe.*']),
    python_requires='>=3.11',
    install_requires=[
        'jax>=0.10.2,<0.12',
        'flax>=0.12.0,<0.14',
        'optax>=0.2.5',
        'orbax-checkpoint>=0.11.0',
        'tensorflow-datasets>=4.9.9',
        'importlib_resources>=6.0',  # imported by TFDS when building datasets
        'array_record>=0.7.0',
        'grain>=0.2.12',
        'ml-collections>=1.0.0',
        'chex>=0.1.90',
        'tensorboardX>=2.6',
        'tqdm>=4.66',
        'absl-py>=2.1',
        'etils[epath]>=1.7',        # epath: local and gs:// run directories
        'numpy>=1.26',
        'scipy>=1.11',              # moe.intervals: Student-t quantiles
        'matplotlib>=3.8',
    ],
    extras_require={
        'test': ['pytest>=8.0', 'pytest-xdist>=3.5', 'tensorboard>=2.16',
                 'sentencepiece>=0.2'],   # its tokenizer, end to end
        'tf': ['tensorflow>=2.16'],
        'gcs': ['gcsfs>=2024.2'],   # gs:// workdirs and data_dirs without TensorFlow
    },
)
