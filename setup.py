"""mr2ct_jax: unpaired MR->CT synthesis with a gradient-consistency CycleGAN in JAX/Flax."""

import setuptools

setuptools.setup(
    name='mr2ct_jax',
    version='0.1.0',
    description='CycleGAN with gradient-consistency loss for unpaired MR-to-CT synthesis (JAX/Flax).',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['mr2ct_jax', 'mr2ct_jax.*']),
    python_requires='>=3.11',
    install_requires=[
        'jax>=0.10.2,<0.11',
        'jaxlib>=0.10.2,<0.11',
        'flax>=0.12.8,<0.13',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.12.8,<0.13',
        'tensorflow-datasets>=4.9.10,<5',
        'array_record>=0.8.6',
        'grain>=0.2.18,<0.3',
        'nibabel>=5.4',
        'numpy>=2.0',
        'ml-collections>=1.1.0',
        'absl-py>=2.5',
        'SimpleITK>=2.5',
        'tensorboardX>=2.6',
        'scipy>=1.13',
        'scikit-image>=0.26,<0.27',  # SynthRAD2023 metrics as the challenge computes them
        'matplotlib>=3.9',
        'tqdm>=4.66',
    ],
    # gs:// workdirs and data dirs (etils epath's fsspec backend).
    extras_require={'test': ['pytest>=9.2', 'pytest-xdist>=3.8'], 'gcs': ['gcsfs>=2024.2']},
    license='Apache-2.0',
)
