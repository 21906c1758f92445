from setuptools import find_packages, setup

setup(
    name="pcseg_kd",
    version="0.1.0",
    description="Cross-modal knowledge distillation for LiDAR semantic segmentation (PSSM, DKD, KD)",
    python_requires=">=3.10",
    packages=find_packages(include=["pcseg_kd", "pcseg_kd.*"]),
    # the official label map; the reader looks for it in the checkout, then here
    data_files=[("share/pcseg_kd", ["data/semantic-kitti.yaml"])],
    # torch is left unpinned here so that GPU users keep their CUDA build; the README's
    # commands pin the CPU wheel (torch==2.13.0) for CPU-only machines.
    install_requires=[
        "torch>=2.1",
        "numpy>=1.23",
        "omegaconf>=2.3",
        "pyyaml>=6",
        "tqdm>=4.60",
        "scikit-learn>=1.2",
        "matplotlib>=3.6",
        "pillow>=9",
        "opencv-python-headless>=4.5",  # reads the KITTI camera images (and writes the synthetic ones)
        "submitit>=1.5",  # a study's cells as local processes or SLURM jobs (tools/kitti_table.py)
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "spconv": ["spconv>=2.3"],  # CPU build; GPU users install spconv-cu1xx instead, or use [gpu]
        # spconv-Triton: spconv's operators in Triton, CUDA only (student.model.backend: spconv_triton
        # or auto); keep [spconv] beside it for CPU runs
        "gpu": ["spconv-triton>=1.0", "triton>=3.0"],
        "vis": ["open3d>=0.17"],
        "tensorboard": ["tensorboard>=2.10"],
        "wandb": ["wandb>=0.17"],  # wandb: {project: ...} in a KITTI config (engine/loggers.py)
        # spconv-triton: tests/test_sparse_backend.py builds and cross-loads models with it on CPU
        # wandb: the offline-run test of the W&B logger; scipy: textbook t quantiles for the paired intervals
        "test": ["pytest>=7", "triton>=3.0", "spconv>=2.3", "spconv-triton>=1.0", "tensorboard>=2.10", "wandb>=0.17",
                 "scipy>=1.9"],
    },
)
