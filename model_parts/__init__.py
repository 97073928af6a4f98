"""The part of a Hugging Face model that one peer runs: config, skeleton, tensors, dummy weights.

Shared by block servers (``blocks/``: a span of decoder layers) and clients (``client/``: the
embeddings and the head), so that neither imports the other's runtime. Imports torch and
transformers in its modules (not here); depends on no other package of this project.
"""
