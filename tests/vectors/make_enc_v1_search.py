"""Regenerate enc_v1_search.json (searchable values, algorithm 0x04) from the construction
described in the module comments of src/crypto/search.rs and src/crypto/envelope.rs,
independently of the Rust code.

Uses the Python `cryptography` package. Run from the repository root:
    python3 tests/vectors/make_enc_v1_search.py > tests/vectors/enc_v1_search.json
The file is checked in; regenerate it only for a deliberate format change (enc:v2).

Term key = HKDF-SHA256(ikm = search key, salt = search key id, info = "pgenvelope/v1/search/"
‖ column id ‖ mode byte (0x01 equality, 0x02 equality-ci)); term = first 17 bytes of
HMAC-SHA256(term key, normalised plaintext). A searchable value is 0x04 ‖ term ‖ an ordinary
0x01/0x03 value, and its AAD covers the search part as well.

Case-insensitive normalisation here is unicodedata.normalize("NFC", s).lower(), against Rust's
nfc() then str::to_lowercase. The two agree on every character of Unicode 14 (the version of
this script's Python 3.11); they differ only on characters whose case mapping was added in
Unicode 15 or later (e.g. U+A7CB, U+10D50..U+10D65, U+16EA0..U+16EB8), which Python 3.11 leaves
unchanged. The plaintexts below use no such character.
"""

import base64
import hashlib
import hmac
import json
import unicodedata
import uuid

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MODES = {"equality": b"\x01", "equality-ci": b"\x02"}


def column_id(column):
    return hashlib.sha256(column.encode()).digest()[:4]


def normalise(mode, plaintext):
    if mode == "equality-ci":
        try:
            text = plaintext.decode("utf-8")
        except UnicodeDecodeError:
            return plaintext  # not UTF-8: hashed as it is
        return unicodedata.normalize("NFC", text).lower().encode("utf-8")
    return plaintext


def term(search_key, search_key_id, column, mode, plaintext):
    term_key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=search_key_id.bytes,
        info=b"pgenvelope/v1/search/" + column_id(column) + MODES[mode],
    ).derive(search_key)
    return hmac.new(term_key, normalise(mode, plaintext), hashlib.sha256).digest()[:17]


def seal_searchable(dek, dek_id, column, org, nonce, plaintext, search_term, row_key=None):
    subkey = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=dek_id.bytes,
        info=b"pgenvelope/v1/enc/" + column_id(column),
    ).derive(dek)
    algorithm = b"\x01" if row_key is None else b"\x03"
    header = b"\x04" + search_term + algorithm + dek_id.bytes + column_id(column)
    assert len(header) == 39
    aad = b"pgenvelope/v1" + header + org.encode()
    if row_key is not None:
        aad += b"\x00" + row_key.encode()
    ct = AESGCM(subkey).encrypt(nonce, plaintext, aad)
    return "enc:v1:" + base64.b64encode(header + nonce + ct).decode()


# Each organisation: its search key and id, its DEK and id.
ORGS = {
    "acme": (bytes(range(0x40, 0x60)), "00000000-0000-4000-8000-0000000000a1",
             bytes(range(32)), "00000000-0000-4000-8000-000000000001"),
    "globex": (bytes([0x3C]) * 32, "5b1e6a7c-2f0d-4e8b-9c3a-7d4f1e2a9b60",
               bytes(reversed(range(32))), "ffffffff-ffff-4fff-bfff-ffffffffffff"),
}

EMAIL = "public.customer.email"
NAME = "public.customer.name"
LONG = "Ünïcödé — Ελληνικά ΚΕΊΜΕΝΑ, Кириллица ЗАГЛАВНЫЕ, 日本語のテキスト, emoji 🔐🗝️, Ǆemal. "

# (name, org, column, mode, nonce, plaintext[, row key])
CASES = [
    ("equality, ascii", "acme", EMAIL, "equality", bytes(12), "ada@example.com"),
    ("equality, mixed-case ascii", "acme", EMAIL, "equality", bytes(range(12)), "Ada@Example.COM"),
    ("equality-ci, lower-case ascii", "acme", EMAIL, "equality-ci", bytes(range(12)),
     "ada@example.com"),
    ("equality-ci, mixed-case ascii", "acme", EMAIL, "equality-ci", bytes([0x11]) * 12,
     "Ada@Example.COM"),
    ("same plaintext, other org", "globex", EMAIL, "equality", bytes(12), "ada@example.com"),
    ("same plaintext, other column", "acme", "public.customer.backup_email", "equality",
     bytes(12), "ada@example.com"),
    ("equality, composed accent", "acme", NAME, "equality", bytes(range(12)), "Café"),
    ("equality, decomposed accent", "acme", NAME, "equality", bytes(range(12)), "Cafe\u0301"),
    ("equality-ci, composed accent", "acme", NAME, "equality-ci", bytes(range(12)), "Café"),
    ("equality-ci, decomposed accent", "acme", NAME, "equality-ci", bytes(range(12)),
     "Cafe\u0301"),
    ("equality-ci, upper-case decomposed accent", "acme", NAME, "equality-ci",
     bytes(range(12, 24)), "CAFE\u0301"),
    ("equality-ci, German sharp s", "acme", NAME, "equality-ci", bytes(range(12)), "Straße"),
    ("equality-ci, capital sharp s", "acme", NAME, "equality-ci", bytes(range(12)), "STRAẞE"),
    # Lower-casing, not case folding: "SS" stays "ss", which is not "ß".
    ("equality-ci, SS is not sharp s", "acme", NAME, "equality-ci", bytes(range(12)), "STRASSE"),
    ("equality-ci, Greek with final sigma", "acme", NAME, "equality-ci", bytes(range(12)),
     "Οδυσσεύς"),
    ("equality-ci, Greek capitals", "acme", NAME, "equality-ci", bytes(range(12)), "ΟΔΥΣΣΕΎΣ"),
    ("equality-ci, Turkish dotted capital I", "acme", NAME, "equality-ci", bytes(range(12)),
     "İstanbul"),
    ("equality-ci, i with combining dot above", "acme", NAME, "equality-ci", bytes(range(12)),
     "i\u0307stanbul"),
    ("equality-ci, dotless ascii istanbul", "acme", NAME, "equality-ci", bytes(range(12)),
     "ISTANBUL"),
    ("equality-ci, not UTF-8, upper", "acme", NAME, "equality-ci", bytes(range(12)),
     b"ABC\xff"),
    ("equality-ci, not UTF-8, lower", "acme", NAME, "equality-ci", bytes(range(12)),
     b"abc\xff"),
    ("equality, empty plaintext", "acme", EMAIL, "equality", bytes(12), ""),
    ("equality-ci, empty plaintext", "acme", EMAIL, "equality-ci", bytes(12), ""),
    ("equality-ci, long non-ascii, stable column id", "globex", "customer-notes-2024",
     "equality-ci", bytes([0xFF]) * 12, LONG * 4),
    ("row-bound, integer key", "acme", EMAIL, "equality", bytes(range(12)), "ada@example.com",
     "17"),
    ("row-bound, uuid key, equality-ci", "acme", EMAIL, "equality-ci", bytes([0x5A]) * 12,
     "ADA@example.com", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
]

# Terms the description says are equal, and pairs it says differ: checked here and by
# tests/vectors.rs, so the file itself pins the normalisation.
EQUAL_TERMS = [
    ["equality-ci, lower-case ascii", "equality-ci, mixed-case ascii",
     "row-bound, uuid key, equality-ci"],
    ["equality-ci, composed accent", "equality-ci, decomposed accent",
     "equality-ci, upper-case decomposed accent"],
    ["equality-ci, German sharp s", "equality-ci, capital sharp s"],
    ["equality-ci, Greek with final sigma", "equality-ci, Greek capitals"],
    ["equality-ci, Turkish dotted capital I", "equality-ci, i with combining dot above"],
    ["equality, ascii", "row-bound, integer key"],
]
DIFFERENT_TERMS = [
    ["equality, ascii", "equality, mixed-case ascii"],
    ["equality, ascii", "equality-ci, lower-case ascii"],
    ["equality, ascii", "same plaintext, other org"],
    ["equality, ascii", "same plaintext, other column"],
    ["equality, composed accent", "equality, decomposed accent"],
    ["equality, composed accent", "equality-ci, composed accent"],
    ["equality-ci, German sharp s", "equality-ci, SS is not sharp s"],
    ["equality-ci, Turkish dotted capital I", "equality-ci, dotless ascii istanbul"],
    ["equality-ci, not UTF-8, upper", "equality-ci, not UTF-8, lower"],
    ["equality, empty plaintext", "equality-ci, empty plaintext"],
]

out = []
for name, org, column, mode, nonce, pt, *row in CASES:
    row_key = row[0] if row else None
    if isinstance(pt, str):
        pt = pt.encode("utf-8")
    search_key, search_key_id, dek, dek_id = ORGS[org]
    search_key_id, dek_id = uuid.UUID(search_key_id), uuid.UUID(dek_id)
    t = term(search_key, search_key_id, column, mode, pt)
    prefix = "enc:v1:" + base64.b64encode(b"\x04" + t).decode()
    text = seal_searchable(dek, dek_id, column, org, nonce, pt, t, row_key)
    assert len(prefix) == 31 and text.startswith(prefix)
    entry = {
        "name": name,
        "search_key": search_key.hex(),
        "search_key_id": str(search_key_id),
        "column": column,
        "column_id": column_id(column).hex(),
        "mode": mode,
        "org": org,
        "dek": dek.hex(),
        "dek_id": str(dek_id),
        "nonce": nonce.hex(),
        "plaintext": pt.hex(),
        "normalised": normalise(mode, pt).hex(),
        "term": t.hex(),
        "prefix": prefix,
        "expected": text,
    }
    if row_key is not None:
        entry["row_key"] = row_key
    out.append(entry)

terms = {v["name"]: v["term"] for v in out}
assert len(terms) == len(out)
for group in EQUAL_TERMS:
    assert len({terms[n] for n in group}) == 1, group
for a, b in DIFFERENT_TERMS:
    assert terms[a] != terms[b], (a, b)

print(json.dumps({
    "format": "enc:v1",
    "algorithm": "0x04 searchable",
    "vectors": out,
    "equal_terms": EQUAL_TERMS,
    "different_terms": DIFFERENT_TERMS,
}, indent=2, ensure_ascii=False))
