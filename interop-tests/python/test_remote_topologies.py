"""The remote tier on the topologies LMCache users run, through the published library.

Each test starts its own servers (redis_topologies.py: a 6-node Redis Cluster made by
``redis-cli --cluster create``, a primary/replica pair under three Sentinels, password- or
TLS-protected single servers) on free loopback ports and always stops them. What is checked:

- cluster: two engine processes share it bit-exactly and chunks land on all three masters (keys carry
  no hash tag); a master killed with ``kill -9`` under load gives misses within blocking_timeout_secs,
  never an error, and hits again once its replica is promoted; a live ``redis-cli --cluster reshard``
  under reads and writes loses no record and loads no wrong byte (MOVED/ASK followed by the client,
  redirects counted per node); a SIGSTOPped master bounds every call by the timeout;
- Sentinel: the primary is found through the Sentinels, and after ``kill -9`` of the primary the
  promoted replica serves the chunks it had;
- a wrong password (ACL user) is a counted failure with a clear message, never a hang or an error
  to the caller; the right one works;
- TLS with a CA file (a CA and server certificate made by openssl for the test).

Every retrieve is checked byte for byte against an oracle computed from the seed (tier_scenario).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import pytest

import tier_scenario as ts
from conftest import run_child_json
from lmcache_native import Engine
from redis_helpers import free_port
from redis_topologies import REDIS_CLI, Cluster, Node, SentinelPair
from test_tiers import Source, check_retrieve, redis_config, tier

TIMEOUT_S = 1.0   # blocking_timeout_secs of these tests
SLACK_S = 1.5     # scheduling slack on a shared 2-core machine
SENTINEL_TIMEOUT_S = 2.0

pytestmark = pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("redis-cli")),
                                reason="redis-server / redis-cli not installed (./build.sh installs them)")


@pytest.fixture
def cluster(tmp_path):
    cluster = Cluster(tmp_path / "cluster").start()
    try:
        yield cluster
    finally:
        cluster.stop()


def nodes(engine: Engine) -> list[dict]:
    index = [t["name"] for t in engine.tier_stats()].index("RemoteBackend")
    return engine.tier_nodes(index)


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def wait_replicated(cluster: Cluster) -> None:
    """Until every replica holds as many keys as its master (replication is asynchronous)."""
    def replicated():
        for master in cluster.masters():
            offset = int(cluster.replication(master)["master_repl_offset"])
            info = cluster.replication(master)
            replica_offsets = [int(v.split("offset=")[1].split(",")[0]) for k, v in info.items() if k.startswith("slave")]
            if not replica_offsets or min(replica_offsets) < offset:
                return False
        return True
    wait_until(replicated, 20, "replicas did not catch up")


# ------------------------------------------------------------------------------------------------
# Cluster
# ------------------------------------------------------------------------------------------------

def test_cluster_two_processes_share_it_bit_exact_on_all_masters(cluster):
    requests = [(i, 160, "") for i in range(4)]  # 4 x 10 chunks of 16 KiB
    url = f"redis://{cluster.seeds(2)}/0"  # two seeds: the client finds the other nodes
    child = run_child_json(f"""
        import json, tier_scenario
        print(json.dumps(tier_scenario.store_requests({redis_config(url)!r}, "cluster-model", 31, {requests!r})))
    """)
    assert child["stored"] == [160] * 4
    remote = [t for t in child["tiers"] if t["name"] == "RemoteBackend"][0]
    assert remote["errors"] == 0, remote

    by_master = cluster.keys_by_master()
    assert len(by_master) == 3 and sum(by_master.values()) == 40, by_master
    assert all(count > 0 for count in by_master.values()), f"chunks must spread over every master: {by_master}"

    # The second engine reaches the same cluster through another seed and the Valkey spelling.
    source, destination = Source(31), ts.Destination()
    config = redis_config(f"valkey://{cluster.nodes[3].address}", extra_config={"valkey_mode": "cluster"})
    with Engine(config, model_name="cluster-model") as engine:
        destination.register(engine)
        ts.wait_for_remote(engine)
        for index, num_tokens, _ in requests:
            assert engine.lookup(source.request(index, num_tokens)[0]) == 160
            check_retrieve(engine, destination, source, index, num_tokens, 160)
        remote = tier(engine, "RemoteBackend")
        assert remote["hits"] == 40 and remote["errors"] == 0, remote
        per_node = {n["endpoint"]: n for n in nodes(engine)}
        masters = {m.address for m in cluster.masters()}
        # Roles are the client's view: a node it has not talked to since the cluster formed may still
        # read "master", so only the true masters are pinned, and every node must be known.
        assert all(per_node[m]["role"] == "master" for m in masters), per_node
        assert {n.address for n in cluster.nodes} <= set(per_node), per_node
        assert all(per_node[m]["bytes_read"] > 0 for m in masters), per_node
        assert sum(per_node[m]["bytes_read"] for m in masters) == remote["bytes_read"], per_node


def test_cluster_master_killed_under_load(cluster):
    source, destination = Source(32), ts.Destination()
    requests = [(i, 160) for i in range(6)]
    config = redis_config(f"redis://{cluster.seeds(3)}/0", blocking_timeout_secs=TIMEOUT_S)
    with Engine(config, model_name="failover") as engine:
        source.register(engine)
        ts.wait_for_remote(engine)
        for index, num_tokens in requests:
            assert engine.store(*source.request(index, num_tokens)) == num_tokens
        engine.flush(30)
        assert tier(engine, "RemoteBackend")["writes"] == 60
        wait_replicated(cluster)
        victim = cluster.masters()[0]

        destination.register(engine)
        timings, hits, killed_at, back_at = [], [], None, None
        started = time.monotonic()
        while back_at is None:
            now = time.monotonic() - started
            if killed_at is None and now > 0.5:
                victim.kill()
                killed_at = now
            assert now < 40, f"hits did not come back after the master was killed (hits {hits[-12:]})"
            engine.clear()  # every retrieve reads the remote tier
            complete = True
            for index, num_tokens in requests:
                # Never an error: a chunk on the dead master's slots ends the prefix (a miss);
                # whatever prefix is reported is checked byte for byte.
                hit, seconds = timed(lambda: check_retrieve(engine, destination, source, index, num_tokens, None))
                timings.append(seconds)
                hits.append(int(hit))
                complete &= hit == 160
            if killed_at is not None and complete and min(hits[-len(requests):]) == 160 and any(h < 160 for h in hits):
                back_at = time.monotonic() - started
        # A retrieve is a lookup and a read, each bounded by the timeout.
        assert max(timings) < 2 * TIMEOUT_S + SLACK_S, f"slowest call {max(timings):.2f} s"
        assert any(h < 160 for h in hits), "the killed master's chunks must miss until its replica takes over"
        remote = tier(engine, "RemoteBackend")
        assert remote["errors"] > 0, remote
        dead = [n for n in nodes(engine) if n["endpoint"] == victim.address]
        assert dead and dead[0]["errors"] > 0 and dead[0]["last_error"], dead
        print(f"killed {victim.address} at {killed_at:.1f} s; every chunk hit again at {back_at:.1f} s; "
              f"slowest call {max(timings):.2f} s; {sum(h < 160 for h in hits)} partial retrieves")


def test_cluster_paused_master_bounds_every_call(cluster):
    source, destination = Source(33), ts.Destination()
    config = redis_config(f"redis://{cluster.seeds(2)}/0", blocking_timeout_secs=TIMEOUT_S)
    with Engine(config, model_name="paused") as engine:
        source.register(engine)
        ts.wait_for_remote(engine)
        tokens, slots = source.request(0, 160)
        assert engine.store(tokens, slots) == 160
        engine.flush(30)
        wait_replicated(cluster)  # a failover during the pause must not lose what was written
        engine.clear()
        destination.register(engine)
        victim = cluster.masters()[1]
        victim.signal(signal.SIGSTOP)
        try:
            timings = []
            for _ in range(3):
                hit, seconds = timed(lambda: engine.lookup(tokens))
                timings.append(seconds)
                assert hit < 160
            _, seconds = timed(lambda: check_retrieve(engine, destination, source, 0, 160, None))
            timings.append(seconds)
            assert max(timings[:3]) < TIMEOUT_S + SLACK_S, timings  # lookups
            assert timings[3] < 2 * TIMEOUT_S + SLACK_S, timings  # a retrieve: a lookup and a read
        finally:
            victim.signal(signal.SIGCONT)
        # The paused master may have been failed over meanwhile; until every client has the new slot
        # map a read may still reach the old master, now a resynchronising replica: a miss, never
        # wrong bytes (check_retrieve checks every prefix it gets).
        def whole_hit():
            engine.clear()
            return check_retrieve(engine, destination, source, 0, 160, None) == 160
        wait_until(whole_hit, 30, "hits did not come back after SIGCONT")


def test_cluster_live_reshard_under_load_loses_nothing(cluster):
    source, destination = Source(34), ts.Destination()
    old = [(i, 160) for i in range(6)]
    new = [(i, 160) for i in range(6, 14)]
    url = f"redis://{cluster.seeds(2)}/0"
    with Engine(redis_config(url), model_name="reshard") as writer, \
            Engine(redis_config(url), model_name="reshard") as reader:
        source.register(writer)
        ts.wait_for_remote(writer)
        for index, num_tokens in old:
            assert writer.store(*source.request(index, num_tokens)) == num_tokens
        writer.flush(30)
        destination.register(reader)
        ts.wait_for_remote(reader)

        masters = cluster.masters()
        from_id, to_id = cluster.node_id(masters[0]), cluster.node_id(masters[1])
        # redis-cli prints a line per slot: into a file, so that a full pipe never stalls it.
        reshard_log = cluster.nodes[0].directory.parent / "reshard.log"
        with open(reshard_log, "wb") as log:
            reshard = subprocess.Popen([REDIS_CLI, "--cluster", "reshard", masters[0].address, "--cluster-from", from_id,
                                        "--cluster-to", to_id, "--cluster-slots", "3000", "--cluster-yes",
                                        "--cluster-pipeline", "4"], stdout=log, stderr=subprocess.STDOUT)
        started = time.monotonic()
        try:
            rounds, full_hits, written = 0, 0, 0
            while reshard.poll() is None or rounds < 2:
                assert time.monotonic() - started < 120, "the reshard did not finish in 120 s"
                # Writes continue while slots move...
                if written < len(new):
                    index, num_tokens = new[written]
                    assert writer.store(*source.request(index, num_tokens)) == num_tokens
                    written += 1
                # ...and every record stored before the reshard is read back whole, byte for byte.
                reader.clear()
                for index, num_tokens in old:
                    check_retrieve(reader, destination, source, index, num_tokens, 160)
                    full_hits += 1
                rounds += 1
            reshard.wait(60)
            output = reshard_log.read_text(errors="replace")
        finally:
            if reshard.poll() is None:
                reshard.kill()
                reshard.wait()
        assert reshard.returncode == 0, output[-2000:]
        while written < len(new):
            index, num_tokens = new[written]
            assert writer.store(*source.request(index, num_tokens)) == num_tokens
            written += 1
        writer.flush(30)
        assert tier(writer, "RemoteBackend")["errors"] == 0, tier(writer, "RemoteBackend")

        by_master = cluster.keys_by_master()
        assert sum(by_master.values()) == 14 * 10, f"records lost or duplicated by the reshard: {by_master}"
        reader.clear()
        for index, num_tokens in old + new:
            check_retrieve(reader, destination, source, index, num_tokens, 160)
        remote = tier(reader, "RemoteBackend")
        assert remote["corrupt_records"] == 0 and remote["errors"] == 0, remote
        redirects = sum(n["redirects"] for n in nodes(reader)) + sum(n["redirects"] for n in nodes(writer))
        assert redirects > 0, "reads of moved slots must have been redirected (MOVED) and counted"
        print(f"reshard: {rounds} rounds of {len(old)} full retrieves during the move, "
              f"{redirects} redirects counted; keys per master after: {by_master}")


# ------------------------------------------------------------------------------------------------
# Sentinel
# ------------------------------------------------------------------------------------------------

def test_sentinel_finds_the_primary_and_follows_a_failover(tmp_path):
    pair = SentinelPair(tmp_path / "sentinel", service="lmcache-svc").start()
    try:
        source, destination = Source(35), ts.Destination()
        url = f"redis-sentinel://{pair.url_hosts}/lmcache-svc"
        # A separate process stores through the Sentinels and exits (its writes finish on close).
        child = run_child_json(f"""
            import json, tier_scenario
            print(json.dumps(tier_scenario.store_requests({redis_config(url, blocking_timeout_secs=2)!r},
                                                          "sentinel-model", 35, [(0, 160, ""), (1, 96, "")])))
        """)
        assert child["stored"] == [160, 96]
        assert len(pair.primary.command("KEYS", "lmcn:*")) == 16
        pair.wait_synced()
        deadline = time.monotonic() + 10
        while len(pair.replica.command("KEYS", "lmcn:*")) < 16:
            assert time.monotonic() < deadline, "the replica did not receive the records"
            time.sleep(0.05)

        # 2 s: a Sentinel connect (ask a Sentinel, then connect to the primary) can take over 1 s here.
        with Engine(redis_config(url, blocking_timeout_secs=SENTINEL_TIMEOUT_S), model_name="sentinel-model") as engine:
            destination.register(engine)
            ts.wait_for_remote(engine)
            check_retrieve(engine, destination, source, 0, 160, 160)
            assert {n["endpoint"] for n in nodes(engine) if n["bytes_read"] > 0} == {pair.primary.address}

            pair.primary.kill()
            timings, hits = [], []

            def retrieve(index, num_tokens):
                engine.clear()
                hit, seconds = timed(lambda: check_retrieve(engine, destination, source, index, num_tokens, None))
                timings.append(seconds)
                hits.append(int(hit))
                return hit == num_tokens

            # Retrieves go on while the Sentinels notice the death and promote the replica: each is a
            # miss or a (bit-exact) hit, within the timeout; the client may read from the replica
            # before the promotion (it prefers the primary, it does not require it).
            started = time.monotonic()

            def promoted():
                retrieve(1, 96)
                return pair.primary_port() == pair.replica.port
            wait_until(promoted, 60, "the Sentinels did not promote the replica")
            promoted_after = time.monotonic() - started
            wait_until(lambda: retrieve(1, 96) and retrieve(0, 160), 60,
                       f"the promoted replica did not serve the chunks it had: {nodes(engine)}")
            # A retrieve is a lookup and a read, each bounded by the timeout.
            assert max(timings) < 2 * SENTINEL_TIMEOUT_S + SLACK_S, timings
            assert any(n["endpoint"] == pair.replica.address and n["bytes_read"] > 0 for n in nodes(engine))
            print(f"Sentinel failover: promoted after {promoted_after:.1f} s, every chunk a hit at "
                  f"{time.monotonic() - started:.1f} s; hits per retrieve {hits}; slowest call {max(timings):.2f} s")
            # Writes reach the promoted primary (a write sent before the client switched was skipped
            # and counted: stored again until it lands).
            tokens, slots = source.request(2, 64)

            def written():
                engine.clear()
                source.register(engine)
                assert engine.store(tokens, slots) == 64
                engine.flush(10)
                return len(pair.replica.command("KEYS", "lmcn:*")) == 20
            wait_until(written, 30, "writes did not reach the promoted replica")
            engine.clear()
            destination.register(engine)
            check_retrieve(engine, destination, source, 2, 64, 64)
    finally:
        pair.stop()


# ------------------------------------------------------------------------------------------------
# Authentication and TLS
# ------------------------------------------------------------------------------------------------

def test_wrong_password_is_a_counted_failure_with_a_clear_message(tmp_path):
    node = Node(tmp_path / "auth", ["--requirepass", "admin-secret"], password="admin-secret").start()
    try:
        assert node.command("ACL", "SETUSER", "lmc", "on", ">right-secret", "~lmcn:*", "+@all") == "OK"
        source, destination = Source(36), ts.Destination()
        tokens, slots = source.request(0, 64)
        bad = redis_config(f"redis://lmc:wrong-secret@{node.address}/0", blocking_timeout_secs=TIMEOUT_S)
        with Engine(bad, model_name="auth") as engine:
            source.register(engine)
            hit, seconds = timed(lambda: engine.lookup(tokens))
            assert hit == 0 and seconds < TIMEOUT_S * 4 + SLACK_S, seconds  # the pool's connects, bounded
            assert engine.store(tokens, slots) == 64, "stores go to the CPU tier whatever the remote says"
            engine.flush(10)
            remote = tier(engine, "RemoteBackend")
            assert remote["errors"] > 0 and remote["writes"] == 0, remote
            # The reason comes from the first connect's log or from the next reconnect attempt.
            def messages():
                return " ".join(n["last_error"] or "" for n in nodes(engine))
            wait_until(lambda: "WRONGPASS" in messages() or "Authentication" in messages(), 15,
                       f"no authentication failure named in {nodes(engine)}")
            assert "wrong-secret" not in messages()
            assert "wrong-secret" not in str(engine.config()), "the password is redacted"
        assert node.command("KEYS", "lmcn:*") == []

        good = redis_config(f"redis://lmc:right-secret@{node.address}/0", blocking_timeout_secs=TIMEOUT_S)
        with Engine(good, model_name="auth") as engine:
            store_then_retrieve_through_the_remote(engine, source, destination, tokens, slots)
            assert tier(engine, "RemoteBackend")["hits"] == 4
    finally:
        node.stop()


def store_then_retrieve_through_the_remote(engine, source, destination, tokens, slots) -> None:
    """Stores request 0 (64 tokens) of ``source``, waits for the write-behind, empties the CPU tier,
    and checks that a retrieve from the remote alone is bit-exact."""
    source.register(engine)
    ts.wait_for_remote(engine)
    assert engine.store(tokens, slots) == 64
    engine.flush(10)
    engine.clear()
    destination.register(engine)
    check_retrieve(engine, destination, source, 0, 64, 64)


def _make_certificates(directory) -> tuple:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl); returns the file paths."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run = lambda *args: subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca_cert, "-days", "2",
        "-subj", "/CN=lmcache-native test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
        "-extfile", ext)
    return ca_cert, cert, key


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl not installed")
def test_tls_with_a_ca_file(tmp_path):
    ca, cert, key = _make_certificates(tmp_path / "pki")
    node = Node(tmp_path / "tls", [])
    tls_port = node.port
    node.port = free_port()  # plain port for the helper's PING; TLS on tls_port
    node.extra = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                  "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
    node.start()
    try:
        source, destination = Source(37), ts.Destination()
        tokens, slots = source.request(0, 64)
        config = redis_config(f"rediss://127.0.0.1:{tls_port}/0", blocking_timeout_secs=2,
                              extra_config={"remote_tls_ca_file": str(ca)})
        with Engine(config, model_name="tls") as engine:
            store_then_retrieve_through_the_remote(engine, source, destination, tokens, slots)
        assert len(node.command("KEYS", "lmcn:*")) == 4
        # Without the CA the server's certificate is not trusted: misses and counted errors, no hang.
        untrusted = redis_config(f"rediss://127.0.0.1:{tls_port}/0", blocking_timeout_secs=TIMEOUT_S)
        with Engine(untrusted, model_name="tls") as engine:
            destination.register(engine)
            hit, seconds = timed(lambda: engine.lookup(tokens))
            assert hit == 0 and seconds < TIMEOUT_S * 4 + SLACK_S
            assert tier(engine, "RemoteBackend")["errors"] > 0
    finally:
        node.stop()


# ------------------------------------------------------------------------------------------------
# lmc_engine_get_tier_nodes
# ------------------------------------------------------------------------------------------------

def test_tier_nodes_size_protocol_local_tiers_and_bad_index(tmp_path, shared_redis_url, unique_model):
    import ctypes

    from lmcache_native import _bindings as b
    from test_tiers import disk_config

    with Engine(disk_config(tmp_path / "disk"), model_name=unique_model) as engine:
        assert engine.tier_nodes(0) == [], "a local tier has no nodes"
        needed = ctypes.c_int64(0)
        assert b.lmc_engine_get_tier_nodes(ctypes.byref(needed), engine.handle, 1, None, 0) == b.LMC_E_NOT_FOUND
        assert b.lmc_engine_get_tier_nodes(ctypes.byref(needed), engine.handle, 0, None, -1) == b.LMC_E_INVALID_ARGUMENT
        assert b.lmc_engine_get_tier_nodes(None, engine.handle, 0, None, 0) == b.LMC_E_INVALID_ARGUMENT

    with Engine(redis_config(shared_redis_url), model_name=unique_model) as engine:
        destination = ts.Destination()
        destination.register(engine)
        ts.wait_for_remote(engine)
        needed = ctypes.c_int64(0)
        assert b.lmc_engine_get_tier_nodes(ctypes.byref(needed), engine.handle, 0, None, 0) == b.LMC_E_BUFFER_TOO_SMALL
        buffer = ctypes.create_string_buffer(needed.value)
        assert b.lmc_engine_get_tier_nodes(ctypes.byref(needed), engine.handle, 0, buffer, needed.value - 1) == \
            b.LMC_E_BUFFER_TOO_SMALL
        assert b.lmc_engine_get_tier_nodes(ctypes.byref(needed), engine.handle, 0, buffer, needed.value) == b.LMC_OK
        listed = json.loads(buffer.value.decode())
        port = shared_redis_url.rsplit(":", 1)[1].split("/")[0]
        assert [n["endpoint"] for n in listed] == [f"127.0.0.1:{port}"], listed
        assert listed[0]["role"] == "master" and listed[0]["connected"] is True
        assert set(listed[0]) == {"endpoint", "role", "connected", "bytes_read", "bytes_written", "errors",
                                  "reconnects", "redirects", "last_error"}
