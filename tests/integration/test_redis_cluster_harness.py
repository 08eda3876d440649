"""The local Redis Cluster harness (``workers.redis_cluster``): it forms 3 masters + 3 replicas, runs
hash-tagged Lua scripts through ``redis.asyncio.cluster.RedisCluster``, and fails a master over to
its replica without losing writes that ``WAIT 1`` acknowledged."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException

from workers.redis_cluster import RedisCluster, cluster_info, cluster_nodes

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with RedisCluster(tmp_path_factory.mktemp("redis-cluster")) as c:
        yield c


def client(c: RedisCluster) -> AsyncRedisCluster:
    return AsyncRedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in c.startup_nodes],
                             retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 20),
                             socket_timeout=2, socket_connect_timeout=1)


def test_cluster_forms(cluster):
    assert cluster.url == f"redis+cluster://127.0.0.1:{cluster.ports[0]}"
    assert len(cluster.startup_nodes) == 6
    assert all(cluster_info(p)["cluster_state"] == "ok" for p in cluster.ports)
    masters = cluster.masters()
    assert len(masters) == 3
    ranges = sorted(rng for _, _, rngs in masters for rng in rngs)
    assert ranges[0][0] == 0 and ranges[-1][1] == 16383
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))  # every slot, once
    views = cluster_nodes(cluster.ports[0])
    for port, proc, _ in masters:
        assert proc.poll() is None
        master_id = next(v.node_id for v in views if v.port == port)
        assert len([v for v in views if v.master_id == master_id and not v.failed]) == 1


def test_hash_tagged_script(cluster):
    lua = ("local n = redis.call('INCRBY', KEYS[1], ARGV[1]) redis.call('SADD', KEYS[2], ARGV[2]) "
           "return {n, redis.call('SCARD', KEYS[2])}")

    async def go():
        r = client(cluster)
        try:
            script = r.register_script(lua)
            assert await script(keys=["{u:1}:cnt", "{u:1}:seen"], args=[3, "item-9"]) == [3, 1]
            assert await script(keys=["{u:1}:cnt", "{u:1}:seen"], args=[4, "item-7"]) == [7, 2]
            with pytest.raises(RedisClusterException, match="same key slot"):
                await script(keys=["{u:1}:cnt", "{u:2}:seen"], args=[1, "x"])
        finally:
            await r.aclose()

    asyncio.run(go())


def test_failover_keeps_acknowledged_writes(cluster):
    keys = [f"ack:{i}" for i in range(60)]

    async def go():
        r = client(cluster)
        try:
            await r.initialize()
            for i, k in enumerate(keys):  # the write and its WAIT on one connection to k's master
                pipe = r.pipeline()
                pipe.set(k, i)
                pipe.execute_command("WAIT", 1, 2000, target_nodes=r.get_node_from_key(k))
                assert await pipe.execute() == [True, 1]
            victim = r.get_node_from_key(keys[0]).port
            moved = [k for k in keys if r.get_node_from_key(k).port == victim]
            info = await asyncio.to_thread(cluster.kill_master_of, keys[0])
            assert info["killed_port"] == victim and info["promoted_port"] != victim
            assert info["failover_s"] < 30
            masters = {port: rngs for port, _, rngs in cluster.masters()}
            assert victim not in masters and info["promoted_port"] in masters
            assert all(cluster_info(p)["cluster_state"] == "ok" for p in cluster.live_ports())
            # the same client object, after the promotion
            assert [int(v) for v in await asyncio.gather(*(r.get(k) for k in keys))] == list(range(len(keys)))
            assert {r.get_node_from_key(k).port for k in moved} == {info["promoted_port"]}
        finally:
            await r.aclose()
        return info

    info = asyncio.run(go())
    cluster.restart(info["killed_port"])
    assert cluster.healthy()
    assert info["killed_port"] not in {port for port, _, _ in cluster.masters()}
