"""Signed artifacts: what the Design node's signature over a bundle or an API package
covers, and how a node that runs it checks it.

The Design node signs, with the key of its identity (its credentials file), one line per
field: a domain tag, the artifact kind (``bundle`` or ``apipkg``), its name (project or
service) and id (bundle id or version), the files digest, the archive's SHA-256, and the
digests of the code environments it runs in.  So a signature vouches for exactly one
artifact: it cannot be moved to another id, and a record whose digests were rewritten to
match other content no longer verifies.  The signature (base64 Ed25519) and the signer's
identity name are stored in the record (``signature``, ``signed_by``).

Automation and API nodes check it before they activate or load the artifact, against the
trusted Design keys: the identities of kind ``node`` and role ``design`` in the
``sy_identities`` bucket that are not revoked.  Trust is on when the node runs with
shipyard credentials (as on every stack ``shipyard up`` starts); a stack started with
``--insecure`` has no identities, its nodes check nothing and unsigned artifacts run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

ARTIFACT_DOMAIN: Final = "shipyard-artifact-v1"
BUNDLE: Final = "bundle"
API_PACKAGE: Final = "apipkg"
TRUSTED_ROLE: Final = "design"


def artifact_bytes(kind: str, name: str, version: str, digest: str, archive_sha256: str,
                   env_digests: Iterable[str] = ()) -> bytes:
    """The bytes the Design node signs for one artifact (see the module docstring)."""
    envs = ",".join(sorted(env_digests))
    return "\n".join((ARTIFACT_DOMAIN, kind, name, version, digest, archive_sha256,
                      envs)).encode()
