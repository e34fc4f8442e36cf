"""A labelled PII corpus for tests/support/data/test_scrub.py, generated deterministically from a seed.

Documents are support e-mails, chat logs, server logs, config files, invoices and notes. Some
sentences plant an item (an e-mail address, phone number, card number, IBAN, IP address, national
ID or secret) whose span and kind are recorded; the rest are clean text written to be hard: version
numbers, dates, times, prices, ISBNs, order and tracking numbers, hex hashes, UUIDs, MAC addresses,
coordinates, large numbers, code. Every planted number is valid for its format (Luhn, mod-97,
check letters, NANP rules), so the scrubber must find it; none of the clean text holds PII, so
anything found there is a false positive.

    python tests/support/pii_corpus.py --out corpus.jsonl    # {"text": ..., "spans": [[start, end, kind], ...]}
"""

from __future__ import annotations

import base64
import json
import random
import string

FIRST = ["James", "Maria", "Wei", "Aisha", "Oliver", "Sofia", "Liam", "Chloé", "Mateo", "Priya", "Noah", "Emma",
         "Lucas", "Fatima", "Hannah", "Kenji", "Olga", "Diego", "Amara", "Jonas", "Ines", "Tomás", "Grace", "Ravi"]
LAST = ["Smith", "Garcia", "Chen", "Khan", "Müller", "Rossi", "Dubois", "Novak", "Okafor", "Tanaka", "Silva",
        "Johansson", "Kowalski", "Haddad", "Nguyen", "Brown", "O'Neil", "Fischer", "Moreau", "Patel", "Costa"]
DOMAINS = ["example.com", "mail.example.org", "acme-corp.io", "uni-heidelberg.de", "gmail.com", "outlook.co.uk",
           "proton.me", "fastmail.fm", "company.com.au", "research.ac.jp", "startup.dev", "bank-ops.eu"]
PRODUCTS = ["router", "laptop", "headset", "dashboard", "billing page", "mobile app", "printer", "API client",
            "backup job", "VPN client", "sync service", "checkout flow"]
TEAMS = ["support", "billing", "platform", "security", "data", "on-call", "finance", "HR"]
WORDS = ("the a an our your this that we they it is was are were be been will would can could should may might "
         "team update meeting customer order issue ticket release deploy server service account report request "
         "week month today yesterday tomorrow morning afternoon please thanks note check fix test review plan "
         "budget invoice payment delivery schedule draft version build pipeline cluster node memory disk error "
         "warning latency traffic user users data file files folder backup restore migration rollout feature "
         "after before during while because since until about around with without into from over under again "
         "still already soon later quickly slowly carefully clearly new old large small first last next other "
         "agreed discussed confirmed noticed reported shipped merged reverted tested measured expected found").split()


# -- valid identifiers ----------------------------------------------------------------------------
def luhn_complete(prefix: str, rng: random.Random, length: int) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    for d in string.digits:
        s = body + d
        total = sum((int(c) * 2 - 9 if int(c) * 2 > 9 else int(c) * 2) if i % 2 else int(c)
                    for i, c in enumerate(reversed(s)))
        if total % 10 == 0:
            return s
    raise AssertionError


def card(rng):
    kind = rng.choice(["visa", "visa", "mc", "mc2", "amex", "disc"])
    if kind == "amex":
        n = luhn_complete(rng.choice(["34", "37"]), rng, 15)
        groups = [n[:4], n[4:10], n[10:]]
    else:
        prefix = {"visa": "4", "mc": str(rng.randint(51, 55)), "mc2": str(rng.randint(2221, 2720)), "disc": "6011"}[kind]
        n = luhn_complete(prefix, rng, 16)
        groups = [n[i:i + 4] for i in range(0, 16, 4)]
    return rng.choice([" ", "-", ""]).join(groups)


IBAN_FORMATS = {"DE": "8n10n", "GB": "4a14n", "FR": "10n11c2n", "NL": "4a10n", "ES": "20n", "IT": "1a10n12c",
                "BE": "12n", "CH": "5n12c", "AT": "16n", "PL": "24n", "IE": "4a14n", "SE": "20n"}


def iban(rng):
    country = rng.choice(list(IBAN_FORMATS))
    fmt, bban, i = IBAN_FORMATS[country], "", 0
    while i < len(fmt):
        j = i
        while fmt[j].isdigit():
            j += 1
        n, cls = int(fmt[i:j]), fmt[j]
        pool = {"n": string.digits, "a": string.ascii_uppercase, "c": string.digits + string.ascii_uppercase}[cls]
        bban += "".join(rng.choice(pool) for _ in range(n))
        i = j + 1
    check = 98 - int("".join(str(int(c, 36)) for c in bban + country + "00")) % 97
    s = f"{country}{check:02d}{bban}"
    return " ".join(s[k:k + 4] for k in range(0, len(s), 4)) if rng.random() < 0.6 else s


def phone(rng):
    a = f"{rng.randint(2, 9)}{rng.randint(0, 8)}{rng.randint(0, 9)}"
    e = f"{rng.randint(2, 9)}{rng.randint(0, 9)}{rng.randint(0, 9)}"
    n = f"{rng.randint(0, 9999):04d}"
    d = lambda k: "".join(rng.choice(string.digits) for _ in range(k))  # noqa: E731
    return rng.choice([
        f"({a}) {e}-{n}", f"{a}-{e}-{n}", f"{a}.{e}.{n}", f"+1 {a} {e} {n}", f"+1-{a}-{e}-{n}", f"1-{a}-{e}-{n}",
        f"020 {rng.randint(7000, 8999)} {d(4)}", f"+44 20 {rng.randint(7000, 8999)} {d(4)}",
        f"07{d(3)} {d(6)}", f"+44 7{d(3)} {d(6)}", f"0161 {d(3)} {d(4)}",
        f"0{rng.randint(1, 7)} {d(2)} {d(2)} {d(2)} {d(2)}", f"+33 {rng.randint(1, 7)} {d(2)} {d(2)} {d(2)} {d(2)}",
        f"+49 30 {d(8)}", f"030 {d(8)}", f"+49 89 {d(7)}", f"+91 9{d(4)} {d(5)}", f"+81 3-{d(4)}-{d(4)}",
        f"+61 2 {d(4)} {d(4)}", f"+1{a}{e}{n}", f"+44{rng.randint(7000, 7999)}{d(6)}", f"+34 6{d(2)} {d(3)} {d(3)}", f"+39 06 {d(4)} {d(4)}", f"+1 ({a}) {e}-{n}",
    ])


def email(rng):
    f, last = rng.choice(FIRST), rng.choice(LAST)
    ascii_ = lambda s: s.translate(str.maketrans("éüáó'", "euao_")).replace("_", "").lower()  # noqa: E731
    f, last = ascii_(f), ascii_(last)
    local = rng.choice([f"{f}.{last}", f"{f[0]}{last}", f"{f}_{last}{rng.randint(1, 99)}", f"{f}+{rng.choice(TEAMS)}",
                        f"{last}.{f}", f"{rng.choice(TEAMS)}-team", f"{f}{rng.randint(1970, 2005)}"])
    return f"{local}@{rng.choice(DOMAINS)}"


def ipv4(rng):
    return rng.choice([f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}", f"10.{rng.randint(0, 255)}."
                       f"{rng.randint(0, 255)}.{rng.randint(1, 254)}", ".".join(str(rng.randint(1, 223)) for _ in range(4)),
                       f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"])


def ipv6(rng):
    h = lambda: f"{rng.randint(0, 0xffff):x}"  # noqa: E731
    return rng.choice([f"2001:db8::{h()}", f"fe80::{h()}:{h()}:{h()}:{h()}", ":".join(h() for _ in range(8)),
                       f"2a00:1450:{h()}:{h()}::{h()}", "::1", f"2607:f8b0:{h()}::200e"])


def ssn(rng):
    area = rng.choice([x for x in range(1, 900) if x != 666])
    return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


def ni(rng):
    first, second = "ABCEGHJKLMNOPRSTWXYZ", "ABCEGHJKLMNPRSTWXYZ"
    while True:
        p = rng.choice(first) + rng.choice(second)
        if p not in ("BG", "GB", "KN", "NK", "NT", "TN", "ZZ"):
            break
    d = [f"{rng.randint(0, 99):02d}" for _ in range(3)]
    return rng.choice([f"{p} {d[0]} {d[1]} {d[2]} {rng.choice('ABCD')}", f"{p}{''.join(d)}{rng.choice('ABCD')}"])


def sin(rng):
    n = luhn_complete(str(rng.choice([1, 2, 3, 4, 5, 6, 7, 9])), rng, 9)
    return rng.choice([f"{n[:3]} {n[3:6]} {n[6:]}", f"{n[:3]}-{n[3:6]}-{n[6:]}"])


def aadhaar(rng):
    from slm.data.scrub import verhoeff_ok
    body = str(rng.randint(2, 9)) + "".join(rng.choice(string.digits) for _ in range(10))
    n = next(body + d for d in string.digits if verhoeff_ok(body + d))
    return f"{n[:4]} {n[4:8]} {n[8:]}"


def dni(rng):
    n = rng.randint(10_000_000, 99_999_999)
    return f"{n}{'TRWAGMYFPDXBNJZSQVHLCKE'[n % 23]}"


def b62(rng, k):
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(k))


def jwt(rng):
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    head = enc({"alg": rng.choice(["HS256", "RS256"]), "typ": "JWT"})
    body = enc({"sub": str(rng.randint(1, 10**9)), "name": rng.choice(FIRST), "iat": 1700000000 + rng.randint(0, 10**7)})
    sig = base64.urlsafe_b64encode(rng.randbytes(32)).rstrip(b"=").decode()
    return f"{head}.{body}.{sig}"


def pem(rng):
    kind = rng.choice(["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY", "ENCRYPTED PRIVATE KEY"])
    body = base64.b64encode(rng.randbytes(rng.choice([120, 240, 600]))).decode()
    lines = "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN {kind}-----\n{lines}\n-----END {kind}-----"


# Secrets: (text before, secret, text after) so a key=value keeps its key outside the span
def secret(rng):
    k = rng.randrange(9)
    if k == 0:
        return "AKIA" + "".join(rng.choice(string.ascii_uppercase + "234567") for _ in range(16))
    if k == 1:
        return "ghp_" + b62(rng, 36)
    if k == 2:
        return rng.choice(["sk-", "sk-proj-"]) + b62(rng, 48)
    if k == 3:
        return f"xoxb-{rng.randint(10**10, 10**11)}-{rng.randint(10**10, 10**11)}-{b62(rng, 24)}"
    if k == 4:
        return jwt(rng)
    if k == 5:
        return "sk_live_" + b62(rng, 24)
    if k == 6:
        return "AIza" + "".join(rng.choice(string.ascii_letters + string.digits + "-_") for _ in range(35))
    if k == 7:
        return "github_pat_" + b62(rng, 22) + "_" + b62(rng, 59)
    return base64.b64encode(rng.randbytes(rng.choice([18, 24, 30]))).decode().rstrip("=")  # a generic value


PLANTS = {
    "EMAIL": (email, ["You can reach me at {} any time this week.", "mailto:{}", "Reply-To: \"Ops\" <{}>", "Please send the signed copy to {}.",
                      "From: {}", "cc'ing {} who owns the {} now.", "Contact: {} (weekdays only)",
                      "User {} reported that the {} crashes on start.", "<{}> wrote:"]),
    "PHONE": (phone, ["Call me on {} if the {} is still down.", "Phone: {}", "My mobile is {}, text first.",
                      "The courier can reach the front desk at {}.", "Tel. {} (office hours 9-17)",
                      "Customer left a voicemail from {} about the {}."]),
    "CARD": (card, ["Please charge the card ending in the number {} for the renewal.", "Card number: {} exp 04/27",
                    "He read out his card, {}, over the phone.", "Payment method: {} (Visa/MC)",
                    "The refund goes back to {} within 5 days."]),
    "IBAN": (iban, ["Wire the deposit to IBAN {} by Friday.", "IBAN: {}, BIC DEUTDEFF",
                    "Our bank details changed; the new account is {}.", "Payee account {} (reference INV-2231)"]),
    "IP": (lambda r: ipv4(r) if r.random() < 0.65 else ipv6(r),
           ["Failed login for admin from {} at 03:12 UTC.", "The {} is reachable at {} inside the VPN.",
            "GET /api/v2/orders 200 12ms client={}", "Blocked {} after 40 attempts.", "upstream connect error to {}:8443", "Set the DNS server to {}."]),
    "NATIONAL_ID": (None, []),
    "SECRET": (secret, ["export API_KEY={}", "token: {}", "Here is the key for staging: {} (rotate after use)",
                        "OPENAI_API_KEY=\"{}\"", "client_secret = '{}'", "Authorization: Bearer {}",
                        "I pasted {} into the ticket by mistake.", "password: {}"]),
}
PREFIXES = {"AK", "gh", "sk", "xo", "ey", "AI", "gi"}
GENERIC_SECRET = ["export API_KEY={}", "token: {}", "client_secret = '{}'", "Authorization: Bearer {}",
                  "password: {}", "aws_secret_access_key = {}", 'SECRET_KEY="{}"', "  api-key: {}",
                  "DB_PASSWORD={} # rotate monthly", '{"access_token": "{}", "expires_in": 3600}']
ID_TEMPLATES = [
    (ssn, ["SSN: {}", "Her social security number is {}.", "Employee SSN {} on file.", "applicant ({}) approved"]),
    (lambda r: "".join(c for c in ssn(r) if c.isdigit()), ["SSN {}", "social security number: {}"]),
    (ni, ["National Insurance number: {}", "NI no. {} for payroll.", "His NINO is {}."]),
    (sin, ["SIN: {}", "My social insurance number is {}.", "SIN {} (Canada)"]),
    (aadhaar, ["Aadhaar: {}", "Aadhaar number {} linked to the account.", "UID {} verified"]),
    (dni, ["DNI {}", "Spanish ID (DNI): {}", "Documento {} presented at check-in."]),
]

# Clean text that looks like the above but is not PII
def near_miss(rng) -> str:
    d = lambda k: "".join(rng.choice(string.digits) for _ in range(k))  # noqa: E731
    hx = lambda k: "".join(rng.choice("0123456789abcdef") for _ in range(k))  # noqa: E731
    y, mo, da = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    options = [
        f"Upgraded to Python 3.{rng.randint(8, 13)}.{rng.randint(0, 12)} and numpy {rng.randint(1, 2)}.{rng.randint(0, 26)}.{rng.randint(0, 5)}.",
        f"Release v{rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 99)} ships on {y}-{mo:02d}-{da:02d}.",
        f"Windows build 10.0.{rng.randint(19041, 22631)}.{rng.randint(1000, 4000)} still shows the bug.",
        f"The meeting moved to {da:02d}/{mo:02d}/{y} at {rng.randint(8, 18)}:{rng.choice(['00', '15', '30', '45'])}.",
        f"Deadline: {mo:02d}.{da:02d}.{y}, 23:59:59 CET.",
        f"Total due: ${rng.randint(1, 9)},{d(3)}.{d(2)} (tax ${rng.randint(10, 999)}.{d(2)}).",
        f"The {rng.choice(PRODUCTS)} costs €{rng.randint(10, 999)},{d(2)} or £{rng.randint(10, 999)}.{d(2)}.",
        f"ISBN 978-{rng.randint(0, 1)}-{d(3)}-{d(5)}-{rng.randint(0, 9)} is the second edition.",
        f"See ISBN {rng.randint(0, 1)}-{d(3)}-{d(5)}-{rng.randint(0, 9)}, chapter {rng.randint(1, 20)}.",
        f"Order #{rng.randint(100000, 999999)} shipped; tracking 1Z{d(3)}AA1{d(10)}.",
        f"Invoice INV-{y}-{d(6)} covers order ORD-{d(8)}.",
        f"Tracking number {rng.choice(['92', '94'])}{d(20)} (USPS).",
        f"Fixed in commit {hx(40)}; see also {hx(7)}.",
        f"sha256 {hx(64)}  {rng.choice(['model.safetensors', 'data.tar.gz', 'setup.exe'])}",
        f"Request id {hx(8)}-{hx(4)}-4{hx(3)}-a{hx(3)}-{hx(12)} timed out after {rng.randint(1, 60)} s.",
        f"The NIC's MAC address is {':'.join(hx(2).upper() for _ in range(6))}.",
        f"Coordinates {rng.uniform(-90, 90):.4f}, {rng.uniform(-180, 180):.4f} (WGS84).",
        f"The population grew to {rng.randint(1, 999)},{d(3)},{d(3)} by {y}.",
        f"We processed {rng.randint(1, 999)} {d(3)} {d(3)} events in {rng.randint(2, 59)} minutes.",
        f"Latency p99 was {rng.randint(10, 999)}.{d(1)} ms at {rng.randint(1, 99)}% load, ratio 16:9.",
        f"Error 0x{hx(8).upper()} while copying {rng.randint(1, 64)}.{rng.randint(0, 9)} GB.",
        f"Call std::vector<int>::push_back {rng.randint(2, 1000)} times; a::b is a path, not an address.",
        f"Docs at https://docs.example.com/v{rng.randint(1, 4)}.{rng.randint(0, 9)}/guide#section-{rng.randint(1, 9)}.",
        f"Ping @{rng.choice(FIRST).lower()} in #{rng.choice(TEAMS)}; write to us at support at example dot org.",
        f"Room {rng.randint(100, 999)}, building {rng.randint(1, 9)}, ZIP {d(5)}, PO Box {d(4)}.",
        f"The part number is {d(3)}-{d(3)} and the lot {d(2)}-{d(4)}.",
        f"Account balance 4,{d(3)},{d(3)}.{d(2)}; interest {rng.randint(1, 9)}.{d(2)}%.",
        f"The cache key is user_{d(6)}_session and max_tokens={rng.randint(1, 4096)}.",
        f"Reference number {d(10)} appears on the letter dated {y}.",
        f"Temperature {rng.randint(-30, 45)}°C at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}, wind {rng.randint(0, 99)} km/h.",
        f"The score was {rng.randint(0, 9)}-{rng.randint(0, 9)} and the attendance {d(2)} {d(3)}.",
        f"Serial SN-{d(4)}-{hx(4).upper()}-{d(4)} is under warranty until {y}.",
        f"Use the token_budget setting (default {rng.randint(100, 9999)}) and the secret_santa_list.txt file.",
        f"Product code {d(13)} (EAN) and SKU {d(6)}-{rng.choice(string.ascii_uppercase)}.",
        f"Version string {rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}-rc{rng.randint(1, 4)} built.",
        f"Listen on port {rng.randint(1024, 65535)}; timeout {rng.randint(1, 120)}s; retries {rng.randint(1, 9)}.",
        f"Call 1-800-FLOWERS or dial {rng.randint(100, 999)} from a desk phone; opening hours 09:00-17:30.",
        f"Dates: {y}/{mo:02d}/{da:02d}, {mo:02d}-{da:02d}-{y}, {da} {rng.choice(['Jan', 'Mar', 'Oct'])} {y}.",
        f"The matrix is {rng.randint(2, 4096)}x{rng.randint(2, 4096)}, seed {d(9)}, step {rng.randint(1, 10**6):,}.",
        f"Items {d(4)} {d(4)} {d(4)} {d(4)} were restocked in aisle {rng.randint(1, 40)}.",
        f"Bank sort code {d(2)}-{d(2)}-{d(2)}, cheque {d(6)}, {rng.randint(1, 30)} pages.",
        f"Build {y}{mo:02d}{da:02d}.{rng.randint(1, 9)} passed {rng.randint(100, 9999)} of {rng.randint(100, 9999)} tests in {rng.randint(1, 99)}.{d(2)} s.",
        f"GPS fix at {rng.randint(0, 89)}°{rng.randint(0, 59)}'{rng.randint(0, 59)}\" N, elevation {d(4)} m.",
        f"The hash function maps {hx(16)} to bucket {rng.randint(0, 255)}; password_min_length = {rng.randint(8, 16)}.",
    ]
    return rng.choice(options)


def filler(rng, n_words: int) -> str:
    out, k = [], 0
    while k < n_words:
        m = rng.randint(6, 18)
        words = [rng.choice(WORDS) for _ in range(m)]
        out.append(" ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"]))
        k += m
    return " ".join(out)


HEADERS = [
    lambda r: f"Subject: Re: {r.choice(PRODUCTS)} issue\nHi {r.choice(FIRST)},\n",
    lambda r: f"[{r.randint(2019, 2026)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d} {r.randint(0, 23):02d}:{r.randint(0, 59):02d}] #{r.choice(TEAMS)}\n",
    lambda r: f"# notes from the {r.choice(TEAMS)} sync, week {r.randint(1, 52)}\n",
    lambda r: f"Ticket {r.randint(1000, 99999)} ({r.choice(['open', 'pending', 'solved'])})\n",
    lambda r: "",
]


def document(rng: random.Random, n_plants: int) -> tuple[str, list[tuple[int, int, str]]]:
    parts: list[str] = []
    spans: list[tuple[int, int, str]] = []
    pos = 0

    def add(text: str, kind: str | None = None):
        nonlocal pos
        if kind:
            spans.append((pos, pos + len(text), kind))
        parts.append(text)
        pos += len(text)

    def sep():
        add(rng.choice([" ", " ", "\n", "\n\n"]) if parts else "")

    add(rng.choice(HEADERS)(rng))
    for _ in range(n_plants):
        sep()
        add(filler(rng, rng.randint(15, 60)))
        sep()
        if rng.random() < 0.7:
            add(near_miss(rng))
            sep()
        if rng.random() < 0.1:  # a private key pasted in a message
            add("Here is the deploy key:\n")
            add(pem(rng), "PRIVATE_KEY")
            continue
        kind = rng.choice(list(PLANTS))
        if kind == "NATIONAL_ID":
            make, templates = rng.choice(ID_TEMPLATES)
        else:
            make, templates = PLANTS[kind]
        item = make(rng)
        # a random string is a secret only by what it is assigned to: generic values get a key name
        template = rng.choice(GENERIC_SECRET if kind == "SECRET" and item[:2] not in PREFIXES else templates)
        before, _, after = template.partition("{}")
        if "{}" in after:  # a second slot: a product name
            after = after.replace("{}", rng.choice(PRODUCTS), 1)
        if "{}" in before:
            before = before.replace("{}", rng.choice(PRODUCTS), 1)
        add(before)
        add(item, kind)
        add(after)
    sep()
    add(filler(rng, rng.randint(20, 80)))
    sep()
    add(near_miss(rng))
    add(f"\n-- \n{rng.choice(FIRST)} {rng.choice(LAST)}, {rng.choice(TEAMS)}\n")
    return "".join(parts), spans


def clean_document(rng: random.Random) -> str:
    parts = [rng.choice(HEADERS)(rng)]
    for _ in range(rng.randint(4, 10)):
        parts.append(filler(rng, rng.randint(20, 70)))
        parts.append(near_miss(rng))
    return "\n".join(parts)


def make_corpus(seed: int = 0, n_docs: int = 300, n_clean: int = 300) -> list[dict]:
    """Documents with planted items (spans labelled) and documents with none."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        text, spans = document(rng, rng.randint(1, 4))
        docs.append({"text": text, "spans": spans})
    for _ in range(n_clean):
        docs.append({"text": clean_document(rng), "spans": []})
    rng.shuffle(docs)
    return docs


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with open(a.out, "w") as f:
        for d in make_corpus(a.seed):
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
