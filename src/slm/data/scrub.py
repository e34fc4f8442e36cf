"""PII and secret scrubbing: find personal data and credentials in text and replace each with a
typed placeholder ([EMAIL], [PHONE], [CARD], [IBAN], [IP], [NATIONAL_ID], [SECRET], [PRIVATE_KEY]).

Each detector is a regular expression for the shape, followed by the check the format itself
carries where it has one (Luhn for card numbers and Canadian SINs, mod-97 and the country's length
for IBANs, the check letter of Spanish DNIs, Verhoeff for Aadhaar numbers, the numbering rules of
US SSNs and UK NI numbers, NANP area and exchange codes, `ipaddress` for IPs, Shannon entropy for
generic key=value secrets). A number that passes no check is left alone, which is what keeps
versions, dates, prices, ISBNs and order numbers in the text. Weak formats (9-digit SINs, 12-digit
Aadhaar numbers, SSNs without dashes) are taken only after a keyword naming them.

    text, counts = scrub_text("mail me at ann@example.org")   # "mail me at [EMAIL]", {"EMAIL": 1}
    slm data scrub --input raw/ --output clean/                # .txt and .jsonl files, counts printed
"""

from __future__ import annotations

import glob
import ipaddress
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass

from tqdm import tqdm

from ..files import atomic_write, output_file, output_folder

KINDS = ("PRIVATE_KEY", "SECRET", "EMAIL", "IBAN", "CARD", "NATIONAL_ID", "IP", "PHONE")  # also the priority


@dataclass(frozen=True)
class Finding:
    start: int
    end: int
    kind: str


# -- checksums ------------------------------------------------------------------------------------
def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# ISO 13616 lengths of the countries that issue IBANs
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29,
    "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}


def iban_ok(iban: str) -> bool:
    if IBAN_LENGTHS.get(iban[:2]) != len(iban):
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


_VERHOEFF_D = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
               [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
               [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
               [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
_VERHOEFF_P = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4], [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
               [8, 9, 1, 6, 0, 4, 3, 5, 2, 7], [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
               [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8]]


def verhoeff_ok(digits: str) -> bool:
    c = 0
    for i, ch in enumerate(reversed(digits)):
        c = _VERHOEFF_D[c][_VERHOEFF_P[i % 8][int(ch)]]
    return c == 0


DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def dni_ok(s: str) -> bool:
    """Spanish DNI (8 digits + letter) or NIE (X/Y/Z + 7 digits + letter): the letter is number mod 23."""
    s = s.upper()
    num = str("XYZ".index(s[0])) + s[1:-1] if s[0] in "XYZ" else s[:-1]
    return DNI_LETTERS[int(num) % 23] == s[-1]


def ssn_ok(digits: str) -> bool:
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def card_ok(digits: str) -> bool:
    n = len(digits)
    if not 13 <= n <= 19 or not luhn_ok(digits):
        return False
    two, four = int(digits[:2]), int(digits[:4])
    return (digits[0] == "4" and n in (16, 19)  # Visa (13-digit ones are long gone; EAN-13 codes are not cards)
            or (51 <= two <= 55 or 2221 <= four <= 2720) and n == 16  # Mastercard
            or two in (34, 37) and n == 15  # American Express
            or (digits.startswith("6011") or two == 65 or 644 <= int(digits[:3]) <= 649) and n in (16, 19)  # Discover
            or 3528 <= four <= 3589 and n in (16, 19)  # JCB
            or two in (36, 38, 30) and n in (14, 16)  # Diners
            or two == 62 and 16 <= n <= 19)  # UnionPay


def entropy(s: str) -> float:
    counts = Counter(s)
    return -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values())


# -- detectors: (kind, pattern, check) -----------------------------------------------------------
# A check gets the match and returns the (start, end) to redact, or None to keep the text.
def _whole(m):
    return m.span()


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def _card(m):
    raw = m.group(0)
    seps = set(re.sub(r"\d", "", raw))
    return m.span() if len(seps) <= 1 and card_ok(_digits(raw)) else None


def _iban(m):
    """Take the country's length of characters (the pattern may have run into a following word)."""
    raw = m.group(0)
    n = IBAN_LENGTHS.get(raw[:2])
    if n is None:
        return None
    taken, end = 0, 0
    for i, ch in enumerate(raw):
        if ch != " ":
            taken += 1
            if taken == n:
                end = i + 1
                break
    if not end or (end < len(raw) and raw[end] != " "):
        return None
    return (m.start(), m.start() + end) if iban_ok(raw[:end].replace(" ", "")) else None


def _ipv4(m):
    return m.span()


def _ipv6(m):
    s = m.group(0)
    if s.count(":") < 2 or (s.count(":") < 7 and "::" not in s):
        return None
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return None
    hexdigits = sum(c in "0123456789abcdefABCDEF" for c in s)
    if s != "::1" and (sum(1 for g in s.split(":") if g) < 2 or hexdigits < 4):  # "::", "a::b": not addresses in prose
        return None
    return m.span()


def _nanp(m):
    d = _digits(m.group("num"))
    d = d[1:] if len(d) == 11 else d  # the country code 1
    return m.span("num") if len(d) == 10 and d[0] in "23456789" and d[3] in "23456789" else None


def _intl(m):
    s = m.group(0).rstrip(" .-")
    d = _digits(s)
    last = re.split(r"[ .\-()]", s)[-1]
    return (m.start(), m.start() + len(s)) if 8 <= len(d) <= 15 and len(last) >= 2 else None


def _national(lo, hi):
    def check(m):
        return m.span() if lo <= len(_digits(m.group(0))) <= hi else None
    return check


def _context_phone(m):
    d = _digits(m.group("num"))
    return m.span("num") if 7 <= len(d) <= 15 else None


def _ssn(m):
    return m.span("num") if ssn_ok(_digits(m.group("num"))) else None


def _ssn_context(m):
    d = _digits(m.group("num"))
    return m.span("num") if len(d) == 9 and ssn_ok(d) else None


def _sin(m):
    d = _digits(m.group("num"))
    return m.span("num") if d[0] not in "08" and luhn_ok(d) else None


def _aadhaar(m):
    d = _digits(m.group("num"))
    return m.span("num") if d[0] not in "01" and verhoeff_ok(d) else None


def _dni(m):
    return m.span() if dni_ok(m.group(0)) else None


def _secret_value(m):
    v = m.group("val")
    classes = sum(bool(re.search(p, v)) for p in ("[a-z]", "[A-Z]", "[0-9]", r"[^A-Za-z0-9]"))
    if len(v) >= 16 and classes >= 2 and entropy(v) >= 3.0 and not re.fullmatch(r"[a-z_.-]+", v):
        return m.span("val")
    return None


_B = r"(?<![\w@.+-])"  # not glued to a longer token on the left
_E = r"(?![\w@-]|\.\w)"  # ... nor on the right (a sentence's full stop is fine)
SECRET_WORDS = (r"(?:api[_-]?key|apikey|api[_-]?secret|secret(?:[_-]?key)?|client[_-]?secret|access[_-]?key"
                r"(?:[_-]?id)?|secret[_-]?access[_-]?key|auth[_-]?token|access[_-]?token|refresh[_-]?token|token"
                r"|passw(?:or)?d|pwd|private[_-]?key|signing[_-]?key|credentials?|bearer)")

DETECTORS: list[tuple[str, re.Pattern, object]] = [
    ("PRIVATE_KEY", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?"
                               r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----", re.S), _whole),
    ("SECRET", re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}(?![A-Za-z0-9])"), _whole),
    ("SECRET", re.compile(r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})"), _whole),
    ("SECRET", re.compile(r"(?<![A-Za-z0-9_-])sk-(?:proj-|svcacct-|admin-|ant-api\d\d-)?[A-Za-z0-9_-]{20,}"), _whole),
    ("SECRET", re.compile(r"(?<![A-Za-z0-9_-])xox[abposr]-[A-Za-z0-9-]{10,}"), _whole),
    ("SECRET", re.compile(r"(?<![A-Za-z0-9_-])[rs]k_(?:live|test)_[A-Za-z0-9]{16,}"), _whole),
    ("SECRET", re.compile(r"(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}"), _whole),
    ("SECRET", re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), _whole),
    ("SECRET", re.compile(r"(?i)(?<![A-Za-z0-9])" + SECRET_WORDS + r"[A-Za-z0-9_-]*[\"']?\s*(?:[:=]|=>|:=)\s*"
                          r"[\"'`]?(?:Bearer\s+)?(?P<val>[A-Za-z0-9+/_\-.=~!@#$%^&*]{16,200}?)[\"'`]?"
                          r"(?=[\s,;)}\]]|$|\.(?:\s|$))"), _secret_value),
    ("SECRET", re.compile(r"(?i)\bAuthorization:\s*(?:Bearer|Basic|Token)\s+(?P<val>[A-Za-z0-9+/_\-.=~]{16,})"),
     _secret_value),
    ("EMAIL", re.compile(r"(?<![\w.+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,62}[A-Za-z0-9_%+-])?@"
                         r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"), _whole),
    ("IBAN", re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{1,4}){3,9}(?![A-Za-z0-9])"), _iban),
    ("CARD", re.compile(r"(?<![\d.,-])\d(?:[ -]?\d){12,18}(?![\d-]|[.,]\d)"), _card),
    ("NATIONAL_ID", re.compile(_B + r"(?P<num>\d{3}-\d{2}-\d{4})" + _E), _ssn),
    ("NATIONAL_ID", re.compile(r"(?i)\b(?:SSN|social security(?: number| no\.?| #)?)\s*(?:#|:|is|was)?\s*"
                               r"(?P<num>\d{3}[ -]?\d{2}[ -]?\d{4})(?!\d)"), _ssn_context),
    ("NATIONAL_ID", re.compile(r"(?<![A-Za-z0-9])(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
                               r"(?: ?\d{2}){3} ?[A-D](?![A-Za-z0-9])"), _whole),
    ("NATIONAL_ID", re.compile(r"(?i)\b(?:SIN|social insurance(?: number| no\.?)?|NAS)\s*(?:#|:|is|was)?\s*"
                               r"(?P<num>\d{3}[ -]?\d{3}[ -]?\d{3})(?!\d)"), _sin),
    ("NATIONAL_ID", re.compile(r"(?i)\b(?:aadhaar|aadhar|UIDAI|UID)(?: number| no\.?| card)?\s*(?:#|:|is|was)?\s*"
                               r"(?P<num>\d{4}[ -]?\d{4}[ -]?\d{4})(?!\d)"), _aadhaar),
    ("NATIONAL_ID", re.compile(r"(?<![A-Za-z0-9])(?:\d{8}|[XYZxyz]\d{7})-?[A-Za-z](?![A-Za-z0-9])"),
     lambda m: m.span() if dni_ok(m.group(0).replace("-", "")) else None),
    ("IP", re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                      r"(?![\w-]|\.\d)"), _ipv4),
    ("IP", re.compile(r"(?<![\w:.])[0-9A-Fa-f:]*:[0-9A-Fa-f:]*(?:\d{1,3}(?:\.\d{1,3}){3})?(?![\w:])"), _ipv6),
    ("PHONE", re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .\-]?\(?\d{1,6}\)?){1,6}(?![\w+])"), _intl),
    ("PHONE", re.compile(r"(?<![\w.+\-/])(?P<num>(?:1[ .-])?(?:\(\d{3}\) ?|\d{3}[.\- ])\d{3}[.\- ]\d{4})"
                         r"(?![\w\-/]|\.\d)"), _nanp),
    ("PHONE", re.compile(r"(?<![\w.+\-/])0[1-9](?:[ .]\d{2}){4}(?![\w\-/]|[.]\d)"), _national(10, 10)),  # FR
    ("PHONE", re.compile(r"(?<![\w.+\-/])0\d{2,4}(?:[ -]\d{3,4}[ -]?|\d{3,4}[ -])\d{3,4}(?![\w\-/]|[.]\d)"),
     _national(10, 11)),  # UK, with a space or dash somewhere (a bare 0-led number is a reference)
    ("PHONE", re.compile(r"(?<![\w.+\-/])0\d{2,4}[ /-]\d{4,8}(?![\w\-/]|[.]\d)"), _national(9, 12)),  # DE
    ("PHONE", re.compile(r"(?i)\b(?:phone|tel|telephone|mobile|cell|fax|whatsapp|call me (?:at|on)|text me (?:at|on))"
                         r"(?: number| no\.?)?\s*(?:[:#]|is)?\s*(?P<num>\+?\(?\d[\d ().\-]{5,18}\d)(?![\w\-])"),
     _context_phone),
]


def find_pii(text: str) -> list[Finding]:
    """Non-overlapping findings in text order; where two overlap, the kind earlier in KINDS wins."""
    found = []
    for kind, pattern, check in DETECTORS:
        for m in pattern.finditer(text):
            span = check(m)
            if span is not None and span[1] > span[0]:
                found.append(Finding(span[0], span[1], kind))
    found.sort(key=lambda f: (KINDS.index(f.kind), f.start, -(f.end - f.start)))
    taken: list[Finding] = []
    for f in found:
        if all(f.end <= t.start or f.start >= t.end for t in taken):
            taken.append(f)
    return sorted(taken, key=lambda f: f.start)


def scrub_text(text: str, counts: Counter | None = None) -> tuple[str, Counter]:
    """The text with every finding replaced by [KIND], and the counts by kind (added to `counts`)."""
    counts = counts if counts is not None else Counter()
    out, pos = [], 0
    for f in find_pii(text):
        out += [text[pos:f.start], f"[{f.kind}]"]
        counts[f.kind] += 1
        pos = f.end
    out.append(text[pos:])
    return "".join(out), counts


def _scrub_json(obj, counts: Counter):
    """Every string in a JSON value, object keys included. A key whose redaction equals another
    key of the same object gets a suffix ("[EMAIL]#2"), so that no value is lost."""
    if isinstance(obj, str):
        return scrub_text(obj, counts)[0]
    if isinstance(obj, list):
        return [_scrub_json(x, counts) for x in obj]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            key = scrub_text(k, counts)[0]
            if key != k:
                base, n = key, 2
                while key in out or key in obj:
                    key, n = f"{base}#{n}", n + 1
            out[key] = _scrub_json(v, counts)
        return out
    return obj


# Byte-order marks, longest first (UTF-32 LE's starts with UTF-16 LE's)
BOMS = ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xef\xbb\xbf", "utf-8"),
        (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


def text_encoding(path: str, head: bytes) -> tuple[str, bytes]:
    """(encoding, byte-order mark) of a text file from its first bytes: the BOM's UTF-8/16/32,
    else UTF-8. Without a BOM, NUL bytes mean UTF-16/32 (or not text): a ValueError, since read
    as UTF-8 such a file would look like text in which nothing is ever found."""
    for bom, encoding in BOMS:
        if head.startswith(bom):
            return encoding, bom
    if b"\x00" in head:
        raise ValueError(f"{path}: holds NUL bytes, so it is UTF-16 or UTF-32 text without a byte-order mark, or not "
                         "text at all; save it as UTF-8 (or with a byte-order mark)")
    return "utf-8", b""


def _txt_blocks(f):
    """A text file in blank-line-separated blocks (a PEM block never holds a blank line), so a
    large file is scrubbed piece by piece and written back byte for byte apart from the findings."""
    block = []
    for line in f:
        block.append(line)
        if not line.strip():
            yield "".join(block)
            block = []
    if block:
        yield "".join(block)


def _jsonl_line(line: str, where: str, counts: Counter) -> str:
    """One line of a .jsonl file, scrubbed: every string of the record, or the whole line as text
    when it is not JSON (a malformed line is never passed through unscrubbed)."""
    try:
        obj = json.loads(line)
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to read") from None
    except ValueError:  # not JSON, or a number of more digits than Python converts
        counts["malformed JSON lines (scrubbed as text)"] += 1
        return scrub_text(line, counts)[0]
    try:
        clean = _scrub_json(obj, counts)
        out = json.dumps(clean, ensure_ascii=False)
        out.encode("utf-8")
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to read") from None
    except UnicodeEncodeError:  # lone surrogates ("\\ud800"): kept as the escapes they were written as
        out = json.dumps(clean)
    return out + "\n"


def scrub_file(src: str, dst: str, counts: Counter) -> None:
    """Scrub one .txt (whole text) or .jsonl (every string of every record, keys included) file
    into dst, atomically, in the file's own encoding (UTF-8, or UTF-16/32 with its byte-order mark).
    A file that is not valid in its encoding is refused: a finding next to a bad byte could be
    missed."""
    if not src.endswith((".txt", ".jsonl")):
        raise ValueError(f"{src}: unsupported file type (slm data scrub reads .txt and .jsonl)")
    with open(src, "rb") as f:
        encoding, bom = text_encoding(src, f.read(65536))
    reading = {"utf-8": "utf-8-sig", "utf-16-le": "utf-16", "utf-16-be": "utf-16"}.get(encoding, "utf-32")
    try:
        with open(src, encoding=reading, newline="") as fin, atomic_write(dst, "wb", flag="--output") as fout:
            fout.write(bom)
            if src.endswith(".txt"):
                for block in _txt_blocks(fin):
                    fout.write(scrub_text(block, counts)[0].encode(encoding))
            else:
                for n, line in enumerate(fin, 1):
                    text = line if not line.strip() else _jsonl_line(line, f"{src}:{n}", counts)
                    fout.write(text.encode(encoding))
    except UnicodeDecodeError as e:
        raise ValueError(f"{src}: not {encoding.upper()} text: {e.reason}; convert it first, e.g. "
                         f"`iconv -f LATIN1 -t UTF-8 {os.path.basename(src)}`") from None


def scrub_path(src: str, dst: str, progress: bool = True) -> dict:
    """Scrub a .txt/.jsonl file, or every such file of a folder, into dst (a file or a folder).
    Returns the report: files, counts by kind and the total."""
    if not dst:
        raise ValueError("--output is empty; give a file or folder")
    if os.path.realpath(src) == os.path.realpath(dst):
        raise ValueError("--output must differ from --input (the input is kept as it was)")
    if os.path.isfile(src):
        pairs = [(src, os.path.join(dst, os.path.basename(src)) if os.path.isdir(dst) else dst)]
        output_file(pairs[0][1], "--output")
    elif os.path.isdir(src):
        files = sorted(f for f in glob.glob(os.path.join(src, "*")) if f.endswith((".txt", ".jsonl")))
        if not files:
            raise ValueError(f"{src}: no .txt or .jsonl files")
        output_folder(dst, "--output")
        pairs = [(f, os.path.join(dst, os.path.basename(f))) for f in files]
        for _, d in pairs:
            output_file(d, "--output")
    else:
        raise FileNotFoundError(f"{src}: no such file or folder")
    for s, d in pairs:
        if os.path.exists(d) and os.path.samefile(s, d):
            raise ValueError(f"--output would write {d} over the input {s} (the input is kept as it was)")
    counts: Counter = Counter()
    for s, d in tqdm(pairs, desc="scrubbing", unit=" files", disable=not progress or len(pairs) < 2):
        scrub_file(s, d, counts)
    redacted = {k: counts[k] for k in KINDS if counts[k]}
    report = {"files": len(pairs), "redacted": redacted, "total": sum(redacted.values())}
    other = {k: v for k, v in counts.items() if k not in KINDS}
    if other:
        report["notes"] = other
    return report
