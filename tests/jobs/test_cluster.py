"""Jobs on a Ray cluster of several nodes, simulated on this machine (``ray.cluster_utils.Cluster``).

The cluster: a head node with no CPU (so no worker runs there) and a Ray client server, and two worker
nodes with one CPU each, whose workers may not download weights (``OMNILABEL_OFFLINE``) and have an empty
weight cache of their own. Every job here runs against that cluster's address and must give what the same
job gives in this process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
from cli_runner import run_subprocess as _cli
from job_outputs import assert_same_annotations, weak_copy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (0 CPUs, Ray client server) + two 1-CPU nodes; workers offline with an empty cache."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cache = tmp_path_factory.mktemp("node-cache")
    env = {"OMNILABEL_OFFLINE": "1", "OMNILABEL_CACHE": str(cache), "RAY_worker_niceness": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the nodes' processes, and so their workers, inherit these
    port = _free_port()
    try:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "ray_client_server_port": port,
                                                          "include_dashboard": False})
        nodes = [c.add_node(num_cpus=1), c.add_node(num_cpus=1)]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    c.client_address = f"ray://127.0.0.1:{port}"
    c.nodes = nodes
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def boxes_job(shapes_coco, tmp_path_factory):
    root = tmp_path_factory.mktemp("clusterjob")
    return root, weak_copy(shapes_coco, root, "boxes")


@pytest.fixture(scope="module")
def reference(boxes_job, tiny_sam_path):
    """The job in this process, the output every cluster run must equal."""
    root, weak = boxes_job
    out = root / "in-process.json"
    r = _cli("pseudomask", weak, "--images", root / "data" / "images", "--sam", tiny_sam_path,
             "--detector", "none", "--num-workers", "0", "-o", out)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())["annotations"]


def _run_library(boxes_job, tiny_sam_path, out: Path, *, address: str, on_event=None):
    from omnilabel.jobs.options import Dataset, JobOptions
    from omnilabel.jobs.pseudomask import PseudomaskConfig, run_pseudomask
    from omnilabel.teachers.loading import TeacherSpec

    root, weak = boxes_job
    config = PseudomaskConfig(teachers=TeacherSpec(sam=str(tiny_sam_path), detector="none"))
    return run_pseudomask(Dataset(weak, root / "data" / "images"), out,
                          JobOptions(address=address, num_workers=2, batch_size=1), config, on_event=on_event)


def test_a_job_spreads_over_two_nodes_and_a_removed_node_hands_its_shards_to_the_other(
        cluster, boxes_job, tiny_sam_path, reference):
    import ray

    events: list[dict] = []
    removed: list[str] = []

    def on_event(ev: dict) -> None:
        events.append(ev)
        if ev["event"] == "progress" and ev["done"] >= 2 and not removed:
            workers = {e["node_id"]: e["pid"] for e in events if e["event"] == "worker"}
            victim = next(n for n in cluster.nodes if n.node_id in workers)
            removed.append(victim.node_id)
            # A node that dies takes its processes with it; a removed raylet alone leaves its worker
            # running a while (actor calls do not go through the raylet).
            os.kill(workers[victim.node_id], signal.SIGKILL)
            cluster.remove_node(victim, allow_graceful=False)

    ray.shutdown()
    try:
        out = boxes_job[0] / "two-nodes.json"
        summary = _run_library(boxes_job, tiny_sam_path, out, address=cluster.address, on_event=on_event)
    finally:
        ray.shutdown()
    started = {e["node_id"] for e in events if e["event"] == "worker"}
    assert {n.node_id for n in cluster.nodes} <= started, "the job should have started a worker on both nodes"
    assert removed, "a node should have been removed mid-job"
    lost = [e["message"] for e in events if e["event"] == "warning" and "was lost" in e["message"]]
    assert lost, f"losing a node should be reported: {events}"
    assert summary["errors"] == 0
    assert_same_annotations(json.loads(out.read_text())["annotations"], reference)


def test_a_worker_that_cannot_find_its_weights_stops_the_job_with_one_clear_message(cluster, boxes_job):
    # The second node is gone after the test above, or not: either way every worker is offline with an
    # empty cache, so a named SAM cannot be had on any node; the driver must not look for it itself.
    root, weak = boxes_job
    r = _cli("pseudomask", weak, "--images", root / "data" / "images", "--sam", "vit_b", "--detector", "none",
             "--address", cluster.address, "--num-workers", "1", "-o", root / "never.json")
    assert r.returncode == 1
    err = r.stderr
    assert "could not start" in err and "on node" in err and socket.gethostname() in err
    assert "vit_b" in err and "omnilabel weights download vit_b" in err
    assert "Traceback" not in err and "core_worker" not in err and "Token authentication" not in err
    assert not (root / "never.json").exists()


def test_a_job_through_a_ray_client_equals_in_process(cluster, boxes_job, tiny_sam_path, reference):
    root, weak = boxes_job
    out = root / "client.json"
    r = _cli("pseudomask", weak, "--images", root / "data" / "images", "--sam", tiny_sam_path,
             "--detector", "none", "--address", cluster.client_address, "--num-workers", "1", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "Token authentication" not in r.stderr and "core_worker" not in r.stderr
    assert_same_annotations(json.loads(out.read_text())["annotations"], reference)
