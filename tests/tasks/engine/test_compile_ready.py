"""GPU readiness, provable on a CPU: every registered task's training step (model and loss) traces as one graph.

`torch.compile(..., fullgraph=True)` refuses any graph break, so a `.item()`, a tensor turned into a Python
number or data-dependent Python control flow in the model or a loss (each a host synchronisation on a GPU) fails
this test. The compiled step must also give the eager loss and gradients.
"""

import pytest
import torch

from tests.fixtures.task_zoo import ZOO_TASKS, build_task, write_zoo


@pytest.mark.parametrize("name", ZOO_TASKS)
def test_training_step_traces_without_a_graph_break(name, tmp_path):
    task = build_task(name, write_zoo(tmp_path, [name])[name])
    torch.manual_seed(0)
    model = task.build_model().train()
    dataset = task.dataset("train")
    batch = task.collate([dataset.sample(i % len(dataset), 0) for i in range(4)])
    counts = {key: torch.tensor(float(max(count, 1))) for key, count in task.label_counts(batch).items()}

    def step(model, batch, counts):  # the trainer's loss: each term's sum over its global count
        output = task.training_step(model, batch)
        return sum(output.loss_sums[key].float() / counts[key] for key in counts)

    eager = step(model, batch, counts)
    eager.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")(model, batch, counts)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(expected)
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, rtol=1e-5, atol=1e-7, msg=key)
