"""Regenerate enc_v1.json from docs/design.md section 1 (ciphertext format), independently of the Rust code.

Uses the Python `cryptography` package. Run from the repository root:
    python3 tests/vectors/make_enc_v1.py > tests/vectors/enc_v1.json
The file is checked in; regenerate it only for a deliberate format change (enc:v2).
Row-bound values (algorithm 0x03) add a zero byte and the row key to the AAD.
"""

import base64
import hashlib
import json
import uuid

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def seal(dek, dek_id, column, org, nonce, plaintext, row_key=None):
    column_id = hashlib.sha256(column.encode()).digest()[:4]
    subkey = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=dek_id.bytes,
        info=b"pgenvelope/v1/enc/" + column_id,
    ).derive(dek)
    algorithm = b"\x01" if row_key is None else b"\x03"
    header = algorithm + dek_id.bytes + column_id
    aad = b"pgenvelope/v1" + header + org.encode()
    if row_key is not None:
        aad += b"\x00" + row_key.encode()
    ct = AESGCM(subkey).encrypt(nonce, plaintext, aad)
    return column_id, "enc:v1:" + base64.b64encode(header + nonce + ct).decode()


CASES = [
    ("empty plaintext", bytes(range(32)), "00000000-0000-4000-8000-000000000001",
     "public.vault_secrets.value", "acme", bytes(12), b""),
    ("ascii secret", bytes(range(32)), "00000000-0000-4000-8000-000000000001",
     "public.vault_secrets.value", "acme", bytes(range(12)), b"sk_live_51H8example"),
    ("same plaintext, other org", bytes(range(32)), "00000000-0000-4000-8000-000000000001",
     "public.vault_secrets.value", "globex", bytes(range(12)), b"sk_live_51H8example"),
    ("same plaintext, other column", bytes(range(32)), "00000000-0000-4000-8000-000000000001",
     "public.users.email", "acme", bytes(range(12)), b"sk_live_51H8example"),
    ("stable column id, utf-8", bytes([0xA5]) * 32, "6f1c2b0e-9a44-4c1d-8f3e-2d7b5a9c0e11",
     "users-email-2024", "org_7f3a", bytes([0xFF]) * 12, "Zoë ✉ 例え".encode()),
    ("256-byte binary, long org", bytes(reversed(range(32))), "ffffffff-ffff-4fff-bfff-ffffffffffff",
     "billing.cards.pan", "o" * 255, bytes([0x5A]) * 12, bytes(i % 256 for i in range(256))),
]

ROW_CASES = [
    ("row-bound, integer key", bytes(range(32)), "00000000-0000-4000-8000-000000000001",
     "public.vault_secrets.value", "acme", bytes(range(12)), b"sk_live_51H8example", "17"),
    ("row-bound, uuid key, utf-8", bytes([0xA5]) * 32, "6f1c2b0e-9a44-4c1d-8f3e-2d7b5a9c0e11",
     "users-email-2024", "org_7f3a", bytes([0xFF]) * 12, "Zoë ✉ 例え".encode(),
     "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
]

out = []
for name, dek, dek_id, column, org, nonce, pt, *row in CASES + ROW_CASES:
    row_key = row[0] if row else None
    column_id, text = seal(dek, uuid.UUID(dek_id), column, org, nonce, pt, row_key)
    entry = {
        "name": name,
        "dek": dek.hex(),
        "dek_id": dek_id,
        "column": column,
        "column_id": column_id.hex(),
        "org": org,
        "nonce": nonce.hex(),
        "plaintext": pt.hex(),
        "expected": text,
    }
    if row_key is not None:
        entry["row_key"] = row_key
    out.append(entry)
print(json.dumps({"format": "enc:v1", "vectors": out}, indent=2, ensure_ascii=False))
