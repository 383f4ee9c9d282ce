"""pocl-ray: curriculum knowledge distillation of LLMs on Ray (POCL and curriculum extraction)."""

__version__ = "0.1.0"
