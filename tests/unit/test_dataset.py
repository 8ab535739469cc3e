"""The expected metric over a dataset: streaming, and sharding with torch.distributed (gloo)."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from steerlens import errors
from steerlens.metric import pullback_metric
from steerlens.metric.dataset import expected_metric
from steerlens.testing import tiny_model

PROMPTS = [
    torch.tensor(p) for p in ([3, 1, 4, 1], [5, 9, 2], [6, 5, 3, 5, 8], [9, 7], [9, 3, 2, 3])
]
SITES = ["resid_pre.0", "z.1:1", "mlp_post.0"]


def test_expected_equals_mean_of_per_prompt(model):
    got = expected_metric(model, iter(PROMPTS), SITES, vocab="full", progress=False)
    for site in SITES:
        each = [pullback_metric(model, p, site, vocab="full").matrix() for p in PROMPTS]
        want = sum(each) / len(each)
        assert float((got[site_name(site)].matrix() - want).norm() / want.norm()) < 1e-10
    info = got[site_name(SITES[0])].info
    assert info is not None and info.n_prompts == len(PROMPTS) and info.world_size == 1


def site_name(spec: str) -> str:
    from steerlens.sites import Site

    return Site.parse(spec).name


def test_expected_metric_rejects_empty_and_bare_strings(model):
    with pytest.raises(errors.InputError, match="empty"):
        expected_metric(model, iter([]), "resid_pre.0", progress=False)
    with pytest.raises(errors.InputError, match="not one string"):
        expected_metric(model, "a prompt", "resid_pre.0", progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, flavour: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = tiny_model(flavour)
        got = expected_metric(model, PROMPTS, SITES, vocab="full", progress=False)
        torch.save(
            {k: m.matrix() for k, m in got.items()}
            | {"info": dataclasses.asdict(got[site_name(SITES[0])].info)},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


# the reduction over ranks does not depend on the architecture: gpt2 checks it by default, and
# test_expected_equals_mean_of_per_prompt covers llama's metric
@pytest.mark.parametrize("flavour", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_sharded_equals_single_process(tmp_path, flavour):
    mp.spawn(_worker, args=(2, _free_port(), flavour, str(tmp_path)), nprocs=2, join=True)
    single = expected_metric(tiny_model(flavour), PROMPTS, SITES, vocab="full", progress=False)
    for rank in range(2):
        shard = torch.load(tmp_path / f"rank{rank}.pt")
        assert shard["info"]["n_prompts"] == len(PROMPTS) and shard["info"]["world_size"] == 2
        for name, metric in single.items():
            want = metric.matrix()
            assert float((shard[name] - want).norm() / want.norm()) < 1e-10
