"""Shared pytest setup: without a GPU, Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before any module defining @triton.jit kernels is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
