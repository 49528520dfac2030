"""Teacher rewrites: a teacher model over an OpenAI-compatible endpoint (``teacher``) and the
methods that use it (``reflection``)."""
