"""Two-tower toy problem for the cross-rank InfoNCE test; imports torch only, so spawned ranks start fast."""

import math

import torch

from tasks.ranking.contrastive import contrastive_loss


def toy_problem():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g), torch.randn(6, 4, generator=g), torch.tensor([1, 1, 0, 1, 1, 1]).bool()


def loss_and_grads(text_in, image_in, valid):
    """A tiny two-tower model on given rows: loss and the gradients of its weights and logit scale."""
    torch.manual_seed(1)
    text_tower, image_tower = torch.nn.Linear(5, 3), torch.nn.Linear(4, 3)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    loss = contrastive_loss(torch.nn.functional.normalize(text_tower(text_in), dim=-1),
                            torch.nn.functional.normalize(image_tower(image_in), dim=-1), log_scale.exp(), valid)
    loss.backward()
    return loss.detach(), [p.grad for p in (*text_tower.parameters(), *image_tower.parameters(), log_scale)]


def rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    text_in, image_in, valid = toy_problem()
    rows = slice(rank * 3, rank * 3 + 3)
    loss, grads = loss_and_grads(text_in[rows], image_in[rows], valid[rows])
    for grad in grads:  # what DistributedDataParallel does with the ranks' gradients
        dist.all_reduce(grad)
        grad /= world
    torch.save({"loss": loss, "grads": grads}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()
