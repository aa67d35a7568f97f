"""subfit: SubFit post-training compression of decoder LLMs, and a fast runtime for the result."""
from setuptools import find_packages, setup

setup(
    name="subfit",
    version="0.1.0",
    description="Submodule-level compression with fitted residual bypasses, plus Triton kernels to run it fast",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["subfit", "subfit.*", "subfit_kernels", "subfit_kernels.*"]),
    package_data={"subfit.runtime": ["*.cpp"]},  # the CPU decode kernels, compiled on first use
    # torch is a lower bound only: an installed torch (CPU wheel here, the user's CUDA build on a
    # GPU machine) always satisfies it, so pip never swaps it for another build.
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "transformers>=4.45",
        "accelerate>=0.30",
        "gguf>=0.10",
        "datasets>=2.19",
        "safetensors>=0.4",
        "packaging>=21",  # subfit_kernels reads the Triton and NumPy versions
        "tqdm>=4.66",
        "rich>=13",
        "ninja>=1.11",  # builds the CPU decode kernels (subfit/runtime/cpu_kernels.py) on first use
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "matplotlib>=3.7"],
        # subfit.harness uses lm-eval's model API (TemplateLM, Collator, generation-kwargs helpers) as of 0.4.13.
        "eval": ["lm-eval>=0.4.13,<0.5"],
    },
    entry_points={
        "console_scripts": ["subfit=subfit.cli:main"],
        # `lm_eval --model subfit` in lm-eval releases that discover model plugins; with 0.4.13 run
        # `python -m subfit.harness` (lm-eval's command line with the model registered).
        "lm_eval.models": ["subfit=subfit.harness:SubfitLM"],
    },
)
