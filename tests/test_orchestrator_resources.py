"""Per-trial resources: sizes, GPU fractions from GPU memory, fit checks (no Ray needed)."""
from __future__ import annotations

import pytest

from orchestrator.cluster.resources import (
    NodeInfo,
    ResourceError,
    check_fit,
    concurrency_capacity,
    format_size,
    nodes_from_ray,
    parse_size,
    plan_resources,
    round_gpu_fraction,
)

GiB = 2**30


@pytest.mark.parametrize("text,expected", [
    ("16GiB", 16 * GiB), ("16gib", 16 * GiB), ("16 GiB", 16 * GiB), ("512MB", 512 * 10**6), ("1.5e10", 15 * 10**9),
    ("2TiB", 2 * 2**40), ("1024", 1024), ("0.5GiB", GiB // 2), ("80G", 80 * 10**9), ("3Ki", 3072),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "16 XB", "-1GiB", "0", "sixteen"])
def test_parse_size_rejects_and_names_the_flag(text):
    with pytest.raises(ResourceError, match="--gpu-memory-per-trial"):
        parse_size(text, "--gpu-memory-per-trial")


def test_format_size():
    assert format_size(16 * GiB) == "16.0GiB"
    assert format_size(512) == "512B"


def test_round_gpu_fraction_rounds_up_to_ray_granularity():
    assert round_gpu_fraction(0.25) == 0.25
    assert round_gpu_fraction(1 / 3) == 0.3334
    assert round_gpu_fraction(16 / 80) == 0.2


def _nodes(*specs):
    return [NodeInfo(node_id=f"n{i}" * 8, address=f"10.0.0.{i}", cpus=c, gpus=g, memory=m * GiB, gpu_memory=gm)
            for i, (c, g, m, gm) in enumerate(specs)]


def test_nodes_from_ray_keeps_alive_nodes_only():
    raw = [
        {"Alive": True, "NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.1",
         "Resources": {"CPU": 8.0, "GPU": 2.0, "memory": 32 * GiB}},
        {"Alive": False, "NodeID": "b" * 56, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 8.0}},
    ]
    nodes = nodes_from_ray(raw)
    assert [(n.address, n.cpus, n.gpus, n.memory) for n in nodes] == [("10.0.0.1", 8.0, 2.0, 32 * GiB)]


def test_gpu_memory_sets_the_fraction_and_the_job_cap():
    nodes = _nodes((16, 4, 128, 80 * GiB))
    r = plan_resources(nodes, gpu_memory_per_trial="16GiB")
    assert r.gpus == 0.2
    assert r.max_gpu_memory == str(16 * GiB)
    assert r.ray_resources() == {"cpu": 1.0, "gpu": 0.2}


def test_gpu_memory_uses_the_smallest_gpu_that_holds_the_request():
    nodes = _nodes((8, 1, 64, 24 * GiB), (8, 1, 64, 80 * GiB), (8, 1, 64, 40 * GiB))
    r = plan_resources(nodes, gpu_memory_per_trial="32GiB")
    assert r.gpus == round_gpu_fraction(32 / 40)  # never less than 32 GiB on any card it may land on
    assert any("smaller" in n for n in r.notes)


def test_gpu_memory_from_flag_overrides_unknown_gpu_memory():
    nodes = _nodes((4, 2, 16, None))
    with pytest.raises(ResourceError, match="--node-gpu-memory"):
        plan_resources(nodes, gpu_memory_per_trial="8GiB")
    r = plan_resources(nodes, gpu_memory_per_trial="8GiB", node_gpu_memory="32GiB")
    assert r.gpus == 0.25


def test_gpu_memory_errors_name_the_flag():
    with pytest.raises(ResourceError, match="--gpu-memory-per-trial.*no GPUs"):
        plan_resources(_nodes((4, 0, 16, None)), gpu_memory_per_trial="8GiB")
    with pytest.raises(ResourceError, match="larger than every GPU"):
        plan_resources(_nodes((4, 1, 16, 24 * GiB)), gpu_memory_per_trial="40GiB")
    with pytest.raises(ResourceError, match="more than --gpus-per-trial"):
        plan_resources(_nodes((4, 1, 16, 80 * GiB)), gpu_memory_per_trial="40GiB", gpus_per_trial=0.25)


def test_fractional_gpu_without_memory_caps_the_job_at_its_fraction():
    r = plan_resources(_nodes((4, 1, 16, None)), gpus_per_trial=0.25)
    assert r.gpus == 0.25 and r.max_gpu_memory == "0.25"
    whole = plan_resources(_nodes((4, 1, 16, None)), gpus_per_trial=1)
    assert whole.max_gpu_memory is None


def test_default_gpu_share_depends_on_the_cluster():
    assert plan_resources(_nodes((4, 0, 16, None))).gpus == 0
    assert plan_resources(_nodes((4, 2, 16, None))).gpus == 1


def test_bad_gpu_counts():
    with pytest.raises(ResourceError, match="--gpus-per-trial"):
        plan_resources(_nodes((4, 4, 16, None)), gpus_per_trial=1.5)
    with pytest.raises(ResourceError, match="--gpus-per-trial"):
        plan_resources(_nodes((4, 4, 16, None)), gpus_per_trial=-1)


def test_memory_per_trial_is_rays_memory_resource():
    r = plan_resources(_nodes((4, 0, 16, None)), memory_per_trial="4GiB")
    assert r.ray_resources()["memory"] == 4 * GiB


def test_check_fit_finds_a_node_or_names_every_flag_at_fault():
    nodes = _nodes((2, 0, 8, None), (4, 1, 16, None))
    assert check_fit(plan_resources(nodes, cpus_per_trial=4, gpus_per_trial=1), nodes).address == "10.0.0.1"
    with pytest.raises(ResourceError) as e:
        check_fit(plan_resources(nodes, cpus_per_trial=8, gpus_per_trial=2, memory_per_trial="64GiB"), nodes)
    msg = str(e.value)
    assert "--cpus-per-trial" in msg and "--gpus-per-trial" in msg and "--memory-per-trial" in msg
    assert "10.0.0.0" in msg and "10.0.0.1" in msg


def test_resources_on_different_nodes_do_not_add_up():
    # 3 CPUs exist in total, but no single node has them
    nodes = _nodes((2, 0, 8, None), (1, 0, 8, None))
    with pytest.raises(ResourceError, match="fits on no node"):
        check_fit(plan_resources(nodes, cpus_per_trial=3), nodes)


def test_concurrency_capacity_packs_fractional_gpus():
    nodes = _nodes((8, 1, 32, None), (8, 1, 32, None))
    assert concurrency_capacity(plan_resources(nodes, cpus_per_trial=1, gpus_per_trial=0.25), nodes) == 8
    assert concurrency_capacity(plan_resources(nodes, cpus_per_trial=3, gpus_per_trial=0.25), nodes) == 4
    assert concurrency_capacity(plan_resources(nodes, cpus_per_trial=1, gpus_per_trial=1), nodes) == 2


@pytest.mark.parametrize("argv,flag", [
    (["run", "--train-data", "x.parquet", "--cpus-per-trial", "0"], "--cpus-per-trial"),
    (["run", "--train-data", "x.parquet", "--cpus-per-trial", "-1"], "--cpus-per-trial"),
    (["run", "--train-data", "x.parquet", "--num-gpus", "-1"], "--num-gpus"),
    (["resume", "demo", "--num-gpus", "-1"], "--num-gpus"),
])
def test_resource_counts_ray_would_refuse_are_refused_at_parse_time(argv, flag, capsys):
    """Ray refused these only once it had started, with its resource dict dumped; argparse names the flag."""
    from orchestrator.cli.main import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"mdsweep {argv[0]}: error: argument {flag}: must be")


def test_a_trial_on_several_workers_needs_them_and_its_driver_on_one_node():
    # each worker asks for the per-trial flags, the driver 0.25 CPU, all on one node (where rank 0's checkpoint is)
    nodes = _nodes((4, 2, 64, None), (4, 2, 64, None))
    req = plan_resources(nodes, cpus_per_trial=1, gpus_per_trial=1, memory_per_trial="8GiB", workers=2)
    assert req.ray_resources() == {"cpu": 0.25, "gpu": 0.0}  # Tune holds the driver; Ray Train the workers
    assert req.worker_resources() == {"CPU": 1.0, "GPU": 1.0, "memory": 8.0 * GiB}
    assert check_fit(req, nodes) is nodes[0] and concurrency_capacity(req, nodes) == 2  # one whole trial a node
    assert req.describe() == "2 workers of 1 CPU, 1 GPU, 8.0GiB host memory and 0.25 CPU for its driver"
    halves = plan_resources(nodes, cpus_per_trial=0.5, gpus_per_trial=0.5, workers=2)
    assert concurrency_capacity(halves, nodes) == 4  # two workers' halves share a GPU; 1.25 CPU a trial
    for flags, says in [(dict(cpus_per_trial=2), "4.25 CPU > 4 (--cpus-per-trial)"),
                        (dict(gpus_per_trial=1, workers=3), "3 x 1 GPU > 2 (--gpus-per-trial)"),
                        (dict(memory_per_trial="40GiB"), "2 x 40.0GiB memory > 64.0GiB (--memory-per-trial)")]:
        many = plan_resources(nodes, **{"workers": 2, "gpus_per_trial": 0, **flags})
        with pytest.raises(ResourceError, match="--workers-per-trial") as raised:
            check_fit(many, nodes)
        assert says in str(raised.value) and concurrency_capacity(many, nodes) == 0
