"""Models: the architectures and their sources (zoo, Hugging Face, factories), specs, rebuilding a model from its spec, starting weights, cutting a model into blocks."""
