"""Code environments on a node: locked, built once per digest, shared, collected.

``uv`` runs uv; the other modules resolve locks (Design node), publish and fetch wheels,
and keep built environments.
"""
