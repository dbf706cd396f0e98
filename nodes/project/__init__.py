"""Projects: the manifest, bundles (packing, verifying, unpacking) and the flow engine."""
