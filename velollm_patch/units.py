"""Byte units, binary as llama.cpp and Ollama print them (MiB in server logs, GiB in VRAM figures)."""

MiB = 1024**2
GiB = 1024**3
