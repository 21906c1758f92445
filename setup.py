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
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "spconv": ["spconv>=2.3"],  # CPU build; GPU users install spconv-cu1xx instead
        "vis": ["open3d>=0.17"],
        "tensorboard": ["tensorboard>=2.10"],
        "test": ["pytest>=7", "triton>=3.0", "spconv>=2.3", "tensorboard>=2.10"],
    },
)
