"""The model organism: a small LLaMA family trained by this project on CPU (see weights/README.md)."""
