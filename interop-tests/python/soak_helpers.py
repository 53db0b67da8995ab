"""Building blocks of the bounded soak (test_soak.py): an independent KV oracle, a prompt family with
overlapping prefixes, the "announced chunks" ledger, and garbage clients for the lookup server.

Nothing here trusts the library. The KV a store puts into the cache is a pure function of
(prefix digest, position, salt, layer, K/V, head, d), so any thread can verify any retrieved token;
a chunk served under the wrong prefix or the wrong salt shows up as wrong bytes. The lookup wire
format is written down here from its specification (LookupChannel.cs' comment), not imported:

    request:  "LMLQ" | version u16 = 1 | reserved u16 | extra key length u32 | token count u32
              | extra key | tokens (int32 each)          (little-endian)
    response: "LMLR" | status i32 | hit tokens i64
"""

from __future__ import annotations

import errno
import hashlib
import random
import select
import socket
import struct
import threading
import time
from collections import Counter

import numpy as np

# ------------------------------------------------------------------------------------------------
# Geometry and the KV oracle
# ------------------------------------------------------------------------------------------------

CHUNK = 16  # chunk_size and block_size
LAYERS, HEADS, HEAD_SIZE = 2, 2, 16  # float32 elements: 512 bytes of KV per token
ELEMENTS_PER_TOKEN = LAYERS * 2 * HEADS * HEAD_SIZE
BYTES_PER_TOKEN = ELEMENTS_PER_TOKEN * 4
CHUNK_BYTES = CHUNK * BYTES_PER_TOKEN  # 8 KiB
MAX_TOKENS = 512  # longest prompt: 32 chunks, 32 blocks
BLOCKS_PER_REGION = MAX_TOKENS // CHUNK
SLOTS_PER_REGION = BLOCKS_PER_REGION * CHUNK

# Salts (extra keys). The KV depends on the salt index, so a cross-salt hit is wrong bytes.
SALTS = (b"", b"tenant-A", b"\x00\xffsalt-B\x01")
SALT_SEEDS = tuple(np.uint32(s) for s in (0x1B873593, 0x6B43A9B5, 0x3C6EF372))

_U32 = np.uint32
_P = 0x01000193  # odd: invertible mod 2^32
_P_INV = pow(_P, -1, 1 << 32)


def _power_table(base: int, count: int) -> np.ndarray:
    values, x = [], 1
    for _ in range(count):
        values.append(x)
        x = (x * base) & 0xFFFFFFFF
    return np.array(values, dtype=np.uint32)


_POWERS = _power_table(_P, MAX_TOKENS + 1)
_INV_POWERS = _power_table(_P_INV, MAX_TOKENS + 1)
# Element index (layer, kv, head, d) in the order of the oracle's [T, L, 2, H, D] arrays.
_ELEMENT_INDEX = np.arange(ELEMENTS_PER_TOKEN, dtype=np.uint32).reshape(LAYERS, 2, HEADS, HEAD_SIZE)


def _fmix32(x: np.ndarray) -> np.ndarray:
    """murmur3's finaliser on uint32 arrays (wrapping arithmetic)."""
    x = x ^ (x >> _U32(16))
    x = x * _U32(0x85EBCA6B)
    x = x ^ (x >> _U32(13))
    x = x * _U32(0xC2B2AE35)
    return x ^ (x >> _U32(16))


def prefix_digests(tokens: np.ndarray) -> np.ndarray:
    """uint32 per token t: a polynomial hash of tokens[0..t] (so it depends on the whole prefix)."""
    n = len(tokens)
    with np.errstate(over="ignore"):
        weighted = (tokens.astype(np.uint32) + _U32(1)) * _INV_POWERS[:n]
        return _POWERS[:n] * np.cumsum(weighted, dtype=np.uint32)


def expected_kv(tokens: np.ndarray, salt_index: int) -> np.ndarray:
    """[T, LAYERS, 2, HEADS, HEAD_SIZE] uint32: the KV bits a store of (tokens, salt) caches for token t.

    A function of the prefix digest, the position and the salt only (never of which thread or slot),
    so every store of the same (tokens, salt) writes the same bits and any thread can check them."""
    n = len(tokens)
    with np.errstate(over="ignore"):
        digest = prefix_digests(tokens)
        per_token = (digest * _U32(0x9E3779B1) + np.arange(n, dtype=np.uint32) * _U32(0x85EBCA77)
                     + SALT_SEEDS[salt_index])
        mixed = per_token[:, None, None, None, None] + _ELEMENT_INDEX[None] * _U32(0xC2B2AE3D)
        return _fmix32(_fmix32(mixed))


def chunk_keys(tokens: np.ndarray, salt_index: int) -> list[bytes]:
    """Exact identity of each full chunk's prefix: digest of (salt, tokens[0 : 16 (k+1)])."""
    h = hashlib.blake2b(SALTS[salt_index] + b"|salt|", digest_size=20)
    keys = []
    raw = tokens.astype("<i4").tobytes()
    for k in range(len(tokens) // CHUNK):
        h.update(raw[k * CHUNK * 4:(k + 1) * CHUNK * 4])
        keys.append(h.copy().digest())
    return keys


class Ledger:
    """Chunks some store was about to store (announced BEFORE the store call). A lookup, retrieve or
    prefetch may only report a prefix whose every chunk was announced: the engine cannot hold a
    chunk nobody stored. This is race-free: announcing first makes it an over-approximation."""

    def __init__(self):
        self._keys: set[bytes] = set()

    def announce(self, keys) -> None:
        self._keys.update(keys)  # one C-level call: atomic under the GIL

    def unannounced(self, keys, hit_tokens: int) -> int | None:
        """Index of the first chunk below hit_tokens nobody stored, or None."""
        for k in range(hit_tokens // CHUNK):
            if keys[k] not in self._keys:
                return k
        return None

    def __len__(self) -> int:
        return len(self._keys)


# ------------------------------------------------------------------------------------------------
# Prompts: a small family of base sequences with shared prefixes and branches
# ------------------------------------------------------------------------------------------------

class Prompts:
    """Base sequences built so that prefixes overlap and identical chunks appear after different
    prefixes (base 1 is base 0 with chunk 0 changed; base 3 is base 2 with chunk 5 changed), plus a
    few branch tails, so a chunk keyed by anything less than its whole prefix would show."""

    BRANCH_POINTS = (48, 100, 200, 333)
    BRANCH_TAILS = 3

    def __init__(self, seed: int = 20240601):
        rng = np.random.default_rng(seed)
        vocab = 32000
        b0 = rng.integers(0, vocab, MAX_TOKENS, dtype=np.int32)
        b1 = b0.copy()
        b1[:CHUNK] = rng.integers(0, vocab, CHUNK, dtype=np.int32)
        b2 = rng.integers(0, vocab, MAX_TOKENS, dtype=np.int32)
        b3 = b2.copy()
        b3[5 * CHUNK:6 * CHUNK] = rng.integers(0, vocab, CHUNK, dtype=np.int32)
        b4 = rng.integers(0, vocab, MAX_TOKENS, dtype=np.int32)
        b5 = b4[::-1].copy()
        self.bases = [b0, b1, b2, b3, b4, b5]
        self.tails = [rng.integers(0, vocab, MAX_TOKENS, dtype=np.int32) for _ in range(self.BRANCH_TAILS)]

    def pick(self, rng: random.Random, max_tokens: int = MAX_TOKENS) -> tuple[np.ndarray, int]:
        """(tokens, salt index): a random length, sometimes a branch; lengths often chunk-aligned."""
        base = self.bases[rng.randrange(len(self.bases))]
        roll = rng.random()
        if roll < 0.4:
            n = CHUNK * rng.randint(1, max_tokens // CHUNK)
        elif roll < 0.5:
            n = rng.randint(1, CHUNK * 2)
        else:
            n = rng.randint(1, max_tokens)
        tokens = base[:n].copy()
        if rng.random() < 0.25:
            point = rng.choice(self.BRANCH_POINTS)
            if point < n:
                tokens[point:] = self.tails[rng.randrange(self.BRANCH_TAILS)][point:n]
        return tokens, rng.randrange(len(SALTS))


# ------------------------------------------------------------------------------------------------
# Lookup wire format and raw clients
# ------------------------------------------------------------------------------------------------

REQUEST_MAGIC, RESPONSE_MAGIC, VERSION = b"LMLQ", b"LMLR", 1


def request_bytes(tokens: np.ndarray, extra_key: bytes, *, version: int = VERSION, token_count: int | None = None,
                  extra_len: int | None = None) -> bytes:
    count = len(tokens) if token_count is None else token_count
    elen = len(extra_key) if extra_len is None else extra_len
    header = REQUEST_MAGIC + struct.pack("<HHII", version, 0, elen, count)
    return header + extra_key + tokens.astype("<i4").tobytes()


def parse_response(data: bytes) -> tuple[int, int]:
    assert len(data) == 16, f"response of {len(data)} bytes"
    assert data[:4] == RESPONSE_MAGIC, f"response magic {data[:4]!r}"
    status, hit = struct.unpack("<iq", data[4:])
    return status, hit


def connect(path: str, timeout: float = 2.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except BaseException:
        s.close()
        raise
    return s


def readable(s: socket.socket) -> bool:
    """Without blocking: is there data or EOF (or an error) to read?"""
    try:
        ready, _, _ = select.select([s], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(ready)


def peer_closed(s: socket.socket) -> bool:
    """Without blocking: has the server closed (or reset) this connection? Unexpected data, which a
    server must not send before a whole request, counts too (the caller closes the socket)."""
    if not readable(s):
        return False
    try:
        s.setblocking(False)
        data = s.recv(64)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    return True


def recv_exact(s: socket.socket, count: int, deadline: float) -> bytes | None:
    """count bytes before the deadline; None when the peer closed first. socket.timeout propagates."""
    chunks, got = [], 0
    while got < count:
        s.settimeout(max(0.001, deadline - time.monotonic()))
        piece = s.recv(count - got)
        if not piece:
            return None
        chunks.append(piece)
        got += len(piece)
    return b"".join(chunks)


def send_quietly(s: socket.socket, data: bytes) -> bool:
    """Send; False when the server has already dropped the connection (which it may)."""
    try:
        s.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (None, errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN,
                                                      errno.EAGAIN, errno.ETIMEDOUT):
            raise
        return False


def vm_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Failures:
    """Thread-safe failure list: every invariant violation lands here (never print-and-continue);
    the test asserts it is empty. Keeps the first few messages per kind and counts the rest."""

    def __init__(self, keep_per_kind: int = 5):
        self._lock = threading.Lock()
        self.count: Counter = Counter()
        self.samples: dict[str, list[str]] = {}
        self._keep = keep_per_kind

    def add(self, kind: str, message: str) -> None:
        with self._lock:
            self.count[kind] += 1
            bucket = self.samples.setdefault(kind, [])
            if len(bucket) < self._keep:
                bucket.append(message)

    def __bool__(self) -> bool:
        return bool(self.count)

    def report(self) -> str:
        with self._lock:
            lines = [f"{kind}: {n}x" for kind, n in sorted(self.count.items())]
            for kind, messages in sorted(self.samples.items()):
                for m in messages:
                    lines.append(f"  [{kind}] {m}")
            return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Garbage clients
# ------------------------------------------------------------------------------------------------

class GarbageFleet:
    """Threads that abuse the lookup server while the soak runs. Each keeps its own Counter (merged
    at the end) and only raw *valid* requests are checked (a correct server answers them right).

    - idle:      ``idle_target`` connections that send nothing, held for the whole run (reopened
                 when the server closes one, which a server with an idle timeout may do);
    - half_open: up to ``half_open_target`` connections that send 1..15 bytes of a valid header, or
                 a whole header and part of its body, and then hold still for 1-6 s;
    - absurd:    valid magic with absurd lengths (token count 2^31, 2^32-1, extra key 2^32-1) and
                 large ones a server may accept (16 Mi or 1 Mi tokens + 1 MiB key) followed by a
                 few bytes, held up to 3 s (the test bounds the process's RSS growth);
    - chaos:     random bytes, wrong version, requests cut off mid-body, requests whose sender
                 disconnects without reading the answer;
    - drip:      up to ``drip_target`` valid requests sent one byte every 20-100 ms; an answer, if
                 one comes, must be right, and a server that gives up on them may close instead;
    - valid_raw: valid requests (1-3 pipelined on one connection) that must be answered right
                 within ``answer_timeout``.
    """

    def __init__(self, socket_path: str, prompts: Prompts, ledger: Ledger, failures: Failures,
                 stop: threading.Event, *, idle_target: int = 24, half_open_target: int = 12,
                 absurd_target: int = 4, drip_target: int = 4, answer_timeout: float = 2.0, seed: int = 7):
        self.path, self.prompts, self.ledger, self.failures, self.stop = socket_path, prompts, ledger, failures, stop
        self.idle_target, self.half_open_target = idle_target, half_open_target
        self.absurd_target, self.drip_target = absurd_target, drip_target
        self.answer_timeout = answer_timeout
        self.seed = seed
        self.counters: dict[str, Counter] = {}
        self.held: list[socket.socket] = []  # idle connections still open when the run stops
        self._held_lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def start(self) -> list[threading.Thread]:
        for index, (name, target) in enumerate((("idle", self._idle), ("half_open", self._half_open),
                                                ("absurd", self._absurd), ("chaos", self._chaos),
                                                ("drip", self._drip), ("valid_raw", self._valid_raw))):
            counter = self.counters.setdefault(name, Counter())
            rng = random.Random(self.seed * 1000 + index)
            thread = threading.Thread(target=self._guard, args=(name, target, rng, counter),
                                      name=f"garbage-{name}", daemon=True)
            self.threads.append(thread)
            thread.start()
        return self.threads

    def total_connections(self) -> int:
        return sum(c["connections"] for c in self.counters.values())

    def close_held(self) -> None:
        with self._held_lock:
            for s in self.held:
                s.close()
            self.held.clear()

    # -- plumbing ---------------------------------------------------------------------------------
    def _guard(self, name, target, rng, counter):
        try:
            target(rng, counter)
        except Exception as e:  # a bug in the client itself must not pass silently
            self.failures.add("garbage client crashed", f"{name}: {e!r}")

    def _connect(self, counter: Counter, timeout: float = 2.0) -> socket.socket | None:
        try:
            s = connect(self.path, timeout)
        except (socket.timeout, OSError) as e:
            counter["connect_failed"] += 1
            counter[f"connect_failed:{type(e).__name__}"] += 1
            return None
        counter["connections"] += 1
        return s

    def _random_request(self, rng, max_tokens: int = MAX_TOKENS):
        tokens, salt = self.prompts.pick(rng, max_tokens)
        return tokens, salt, request_bytes(tokens, SALTS[salt])

    def _check_answer(self, kind: str, data: bytes, tokens, salt: int) -> bool:
        """A well-formed, successful, possible answer for (tokens, salt)."""
        try:
            status, hit = parse_response(data)
        except AssertionError as e:
            self.failures.add(f"{kind}: malformed answer", str(e))
            return False
        n = len(tokens)
        if status != 0:
            self.failures.add(f"{kind}: answer with status {status}", f"n={n} salt={salt}")
            return False
        if not (0 <= hit <= n) or hit % CHUNK:
            self.failures.add(f"{kind}: impossible hit", f"hit={hit} n={n} salt={salt}")
            return False
        bad = self.ledger.unannounced(chunk_keys(tokens, salt), hit)
        if bad is not None:
            self.failures.add(f"{kind}: hit of a chunk nobody stored", f"hit={hit} n={n} salt={salt} chunk={bad}")
            return False
        return True

    # -- the clients --------------------------------------------------------------------------------
    def _idle(self, rng, counter):
        while not self.stop.is_set():
            with self._held_lock:
                alive = []
                for s in self.held:
                    if peer_closed(s):
                        counter["closed_by_server"] += 1
                        s.close()
                    else:
                        alive.append(s)
                self.held[:] = alive
                missing = self.idle_target - len(alive)
            for _ in range(missing):
                if self.stop.is_set():
                    break
                s = self._connect(counter)
                if s is not None:
                    with self._held_lock:
                        self.held.append(s)
            self.stop.wait(0.2)

    def _half_open(self, rng, counter):
        open_ = []  # (socket, close_at)
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                keep = []
                for s, close_at in open_:
                    if peer_closed(s):
                        counter["closed_by_server"] += 1
                        s.close()
                    elif now >= close_at:
                        counter["closed_by_us"] += 1
                        s.close()
                    else:
                        keep.append((s, close_at))
                open_ = keep
                while len(open_) < self.half_open_target and not self.stop.is_set():
                    s = self._connect(counter)
                    if s is None:
                        break
                    tokens, salt, request = self._random_request(rng)
                    if rng.random() < 0.6:
                        cut = rng.randint(1, 15)  # part of the header
                    else:
                        cut = 16 + rng.randint(0, max(0, len(request) - 17))  # header and part of the body
                    send_quietly(s, request[:cut])
                    open_.append((s, time.monotonic() + rng.uniform(1.0, 6.0)))
                self.stop.wait(0.1)
        finally:
            for s, _ in open_:
                s.close()

    ABSURD_HEADERS = (
        ("tokens_2^31", 0, 1 << 31),
        ("tokens_2^32-1", 0, (1 << 32) - 1),
        ("extra_2^32-1", (1 << 32) - 1, 0),
        ("both_max_u32", (1 << 32) - 1, (1 << 32) - 1),
        ("tokens_2^30", 0, 1 << 30),
        # Large but maybe within a server's bounds: must not cost what they announce.
        ("16Mi_tokens_1MiB_key", 1 << 20, 16 << 20),
        ("1Mi_tokens_1MiB_key", 1 << 20, 1 << 20),
    )
    # Half of the absurd connections announce one of the two large-but-plausible bodies.
    ABSURD_WEIGHTS = (1, 1, 1, 1, 1, 2.5, 2.5)

    def _absurd(self, rng, counter):
        open_ = []  # (socket, close_at, name)
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                keep = []
                for s, close_at, name in open_:
                    if peer_closed(s):
                        counter[f"closed_by_server:{name}"] += 1
                        s.close()
                    elif now >= close_at:
                        counter[f"held_open_3s:{name}"] += 1
                        s.close()
                    else:
                        keep.append((s, close_at, name))
                open_ = keep
                while len(open_) < self.absurd_target and not self.stop.is_set():
                    s = self._connect(counter)
                    if s is None:
                        break
                    name, extra_len, count = rng.choices(self.ABSURD_HEADERS, self.ABSURD_WEIGHTS)[0]
                    header = REQUEST_MAGIC + struct.pack("<HHII", VERSION, 0, extra_len, count)
                    body = bytes(rng.getrandbits(8) for _ in range(rng.choice((0, 0, 7, 100))))
                    send_quietly(s, header + body)
                    counter[f"sent:{name}"] += 1
                    open_.append((s, time.monotonic() + rng.uniform(0.5, 3.0), name))
                self.stop.wait(0.05)
        finally:
            for s, _, _ in open_:
                s.close()

    def _chaos(self, rng, counter):
        while not self.stop.is_set():
            s = self._connect(counter, timeout=1.0)
            if s is None:
                self.stop.wait(0.05)
                continue
            with s:
                kind = rng.randrange(6)
                if kind == 0:  # random bytes (maybe a lot), then see whether the server drops us
                    size = rng.choice((1, 3, 15, 16, 17, 64, 4096))
                    data = bytes(rng.getrandbits(8) for _ in range(size))
                    if data[:4] == REQUEST_MAGIC:
                        data = b"XXXX" + data[4:]
                    send_quietly(s, data)
                    counter["random_bytes"] += 1
                elif kind == 1:  # right magic, wrong version
                    tokens, salt, request = self._random_request(rng, 64)
                    send_quietly(s, request[:4] + struct.pack("<H", rng.choice((0, 2, 0xFFFF))) + request[6:])
                    counter["wrong_version"] += 1
                elif kind == 2:  # cut mid-body, then disconnect at once
                    tokens, salt, request = self._random_request(rng)
                    send_quietly(s, request[:rng.randint(16, len(request) - 1)] if len(request) > 17 else request[:10])
                    counter["cut_mid_request"] += 1
                    continue
                elif kind == 3:  # whole valid request, disconnect without reading the answer
                    tokens, salt, request = self._random_request(rng)
                    send_quietly(s, request)
                    counter["valid_then_disconnect"] += 1
                    continue
                elif kind == 4:  # header only, disconnect
                    tokens, salt, request = self._random_request(rng)
                    send_quietly(s, request[:16])
                    counter["header_then_disconnect"] += 1
                    continue
                else:  # shut down our sending side half-way: the server reads EOF mid-request
                    tokens, salt, request = self._random_request(rng)
                    send_quietly(s, request[:max(1, len(request) // 2)])
                    try:
                        s.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    counter["half_close_mid_request"] += 1
                # For the garbage kinds above: a server may drop us or wait; we wait up to 0.5 s.
                try:
                    s.settimeout(0.5)
                    data = s.recv(64)
                    counter["dropped_by_server" if not data else "unexpected_bytes_back"] += 1
                except socket.timeout:
                    counter["server_kept_waiting"] += 1
                except OSError:
                    counter["dropped_by_server"] += 1

    def _drip(self, rng, counter):
        drips = []  # dicts: socket, request, sent, next_at, tokens, salt
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                keep = []
                for d in drips:
                    s = d["socket"]
                    if d["sent"] < len(d["request"]):
                        if now < d["next_at"]:
                            keep.append(d)
                            continue
                        if not send_quietly(s, d["request"][d["sent"]:d["sent"] + 1]):
                            counter["cut_by_server"] += 1
                            s.close()
                            continue
                        d["sent"] += 1
                        d["next_at"] = now + rng.uniform(0.02, 0.1)
                        if d["sent"] == len(d["request"]):
                            d["answer_by"] = now + self.answer_timeout
                            counter["fully_sent"] += 1
                        keep.append(d)
                        continue
                    # Fully sent: wait for the answer without blocking the other drips.
                    data = None
                    if readable(s):
                        try:
                            data = s.recv(16, socket.MSG_PEEK)
                        except OSError:
                            data = b""
                    if data is None:
                        if now > d["answer_by"]:
                            self.failures.add("drip: whole request sent, no answer in time",
                                              f"{len(d['request'])} bytes, waited {self.answer_timeout} s")
                            s.close()
                        else:
                            keep.append(d)
                        continue
                    if len(data) < 16 and data:
                        keep.append(d)  # partial answer: wait for the rest
                        continue
                    if not data:
                        counter["cut_by_server"] += 1
                    else:
                        answer = s.recv(16)
                        if self._check_answer("drip", answer, d["tokens"], d["salt"]):
                            counter["answered"] += 1
                    s.close()
                drips = keep
                while len(drips) < self.drip_target and not self.stop.is_set():
                    s = self._connect(counter)
                    if s is None:
                        break
                    s.setblocking(True)
                    s.settimeout(1.0)
                    tokens, salt, request = self._random_request(rng, 48)
                    drips.append({"socket": s, "request": request, "sent": 0, "next_at": 0.0,
                                  "tokens": tokens, "salt": salt})
                self.stop.wait(0.01)
        finally:
            for d in drips:
                d["socket"].close()

    def _valid_raw(self, rng, counter):
        while not self.stop.is_set():
            s = self._connect(counter)
            if s is None:
                self.stop.wait(0.05)
                continue
            with s:
                requests = [self._random_request(rng) for _ in range(rng.randint(1, 3))]
                started = time.monotonic()
                counter["requests_sent"] += len(requests)
                if not send_quietly(s, b"".join(r[2] for r in requests)):
                    self.failures.add("valid_raw: server dropped a valid request", f"{len(requests)} pipelined")
                    continue
                deadline = started + self.answer_timeout
                for tokens, salt, _ in requests:
                    try:
                        answer = recv_exact(s, 16, deadline)
                    except socket.timeout:
                        self.failures.add("valid_raw: no answer in time",
                                          f"{len(requests)} pipelined requests, {self.answer_timeout} s")
                        counter["timed_out"] += 1
                        break
                    except OSError as e:
                        self.failures.add("valid_raw: connection broken", repr(e))
                        break
                    if answer is None:
                        self.failures.add("valid_raw: server closed before answering", f"{len(requests)} pipelined")
                        break
                    if self._check_answer("valid_raw", answer, tokens, salt):
                        counter["answered"] += 1
                counter["latency_max_ms"] = max(counter["latency_max_ms"], int((time.monotonic() - started) * 1000))
            self.stop.wait(rng.uniform(0.0, 0.05))
