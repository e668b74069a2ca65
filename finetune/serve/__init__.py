"""Stage 6, serving: the runtimes that ship the GGUF (Ollama: provision, serve, deploy; llama.cpp)."""
