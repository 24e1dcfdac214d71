"""Kernels. Each op is a plain torch reference; fast (Triton) versions sit beside them with the same signature."""
