"""Media as content-addressed, end-to-end encrypted blobs (sans-IO).

A file is encrypted on the client with a fresh random 32-byte key, in blocks of at most 256 KiB
of plaintext: XChaCha20-Poly1305 with a nonce derived from the block index (never reused under
one key: each key encrypts one file) and the index in the associated data, so blocks cannot be
reordered. Each encrypted block is stored on the server under its BLAKE3-256 hash. A manifest
(CBOR: total size, block size, block hashes, BLAKE3 of the plaintext) is encrypted with the same
key and stored the same way. The message that shares the file carries a :class:`MediaRef`
(manifest hash, key, size, mimetype, name, kind, optional width/height/duration) inside its
E2EE content, so the server only ever sees ciphertext and hashes.

The server keeps blocks per room (``CASPut``/``CASGet``/``CASProof``/``CASDelete``, payloads
``CasBlock``/``CasHashes``): only room members may put or get, each block's hash is checked, a
block stored twice is kept once (reference counted per room and uploader), and its size and the
declared blob size are held to the server's limits (``server.media.max_size``).
"""

from .blob import (
    BLOCK_SIZE,
    KINDS,
    MAX_BLOCK,
    BlobDecryptor,
    BlobEncryptor,
    EncryptedBlock,
    Manifest,
    MediaError,
    MediaRef,
    block_hash,
)

__all__ = [
    "BLOCK_SIZE",
    "KINDS",
    "MAX_BLOCK",
    "BlobDecryptor",
    "BlobEncryptor",
    "EncryptedBlock",
    "Manifest",
    "MediaError",
    "MediaRef",
    "block_hash",
]
