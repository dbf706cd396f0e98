"""Identities, credentials, NATS permissions per role and node, and signed commands.

``keys`` (credentials files, signing keys), ``store`` (the auth directory and the
nats-server config), ``permissions`` (what each identity may publish and subscribe to),
``signing`` (the CLI and nodes sign what they send), ``guard`` (the Deployer and Govern
verify what they receive), ``registry`` (identities published to the ``sy_identities``
KV bucket, which verifiers read), ``stack`` (what ``shipyard up`` keeps in its home).
"""
