"""The llama.cpp engine (llama-cpp-python): load, decode, batched sequences, prefix caches."""
